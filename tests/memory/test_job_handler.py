"""The job handler: an exchange's decision, saved before it is applied."""

import pytest

from memory.config import MemoryConfig
from memory.extraction import ExtractionError
from memory.extraction_keys import ExtractionKeys
from memory.job_handler import JobHandler
from memory.models import Operation
from memory.spool import Job
from memory.workers import Deferred, LeaseLost
from tests.memory.helpers import exchange


class Store:
    def __init__(self) -> None:
        self.applied: list[list[Operation]] = []

    async def related(self, scope, text, k):
        return []

    async def apply(self, scope, ops, **kwargs):
        self.applied.append(list(ops))


class Spool:
    def __init__(self, *, saves: bool = True, owns: bool = True) -> None:
        self.saves = saves
        self.owned = owns
        self.saved: list[list[Operation]] = []

    async def save_decision(self, job, ops):
        self.saved.append(list(ops))
        return self.saves

    async def owns(self, job):
        return self.owned


class Extractor:
    needs_key = True

    def __init__(self, ops=None, error=None) -> None:
        self.ops = ops or []
        self.error = error
        self.keys: list[str | None] = []

    async def decide(self, exchange, existing, api_key=None):
        self.keys.append(api_key)
        if self.error is not None:
            raise self.error
        return self.ops


def handler(extractor, *, store=None, spool=None, configured=None, user_key=None):
    keys = ExtractionKeys(configured, extractor, handoff=None, wake=lambda: None)
    if user_key:
        keys.provide("alice", user_key)
    return JobHandler(
        MemoryConfig(),
        store=store or Store(),
        spool=spool or Spool(),
        extractor=extractor,
        keys=keys,
        redact=lambda text: text.replace("secret", "[redacted]"),
    )


def job(decision=None) -> Job:
    return Job(
        id="j1",
        user_id="alice",
        exchange=exchange("alice", "I like tea"),
        attempts=1,
        lease="l",
        decision=decision,
    )


async def test_a_job_waits_while_no_key_may_go_to_the_endpoint():
    extractor = Extractor()
    with pytest.raises(Deferred):
        await handler(extractor).process(job())
    assert extractor.keys == []


async def test_the_decision_is_redacted_saved_then_applied_with_the_users_key():
    store, spool = Store(), Spool()
    extractor = Extractor([Operation(op="ADD", text="my secret is tea")])
    await handler(extractor, store=store, spool=spool, user_key="sk-a").process(job())
    assert extractor.keys == ["sk-a"]
    assert spool.saved == [[Operation(op="ADD", text="my [redacted] is tea")]]
    assert store.applied == spool.saved


async def test_a_saved_decision_is_applied_without_asking_again_unless_the_lease_is_lost():
    store = Store()
    extractor = Extractor()
    decided = job([Operation(op="ADD", text="tea")])
    await handler(extractor, store=store, configured="sk").process(decided)
    assert extractor.keys == []
    assert store.applied == [[Operation(op="ADD", text="tea")]]
    with pytest.raises(LeaseLost):
        await handler(extractor, spool=Spool(owns=False), configured="sk").process(decided)


async def test_an_error_echoing_the_key_is_redacted_and_no_key_defers():
    error = ExtractionError("bad key sk-a", category="auth")
    with pytest.raises(ExtractionError) as caught:
        await handler(Extractor(error=error), user_key="sk-a").process(job())
    assert "sk-a" not in caught.value.reason
    assert "sk-a" not in str(caught.value)
    no_key = ExtractionError("who are you", category="no_key")
    with pytest.raises(Deferred):
        await handler(Extractor(error=no_key), user_key="sk-a").process(job())
