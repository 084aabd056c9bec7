# ruff: noqa: RUF001 - Chinese punctuation is meant literally in these tests.
"""The engine end to end with a scripted extraction model: exchanges become facts."""

import asyncio
import sqlite3
from datetime import UTC, datetime, timedelta

import httpx
import pytest
from scripted_llm import Call, ScriptedLLM, ops

from memory.config import LLMConfig, MemoryConfig, SpoolConfig
from memory.engine import MemoryEngine
from memory.models import Exchange, ImportResult, Scope

ALICE = Scope(user_id="alice")
BOB = Scope(user_id="bob")
AT = datetime(2026, 3, 13, 9, 30, tzinfo=UTC)
CONFIG_KEY = "sk-config-0123456789abcdefghij"


def exchange(scope: Scope, text: str, reply: str = "OK", at: datetime = AT) -> Exchange:
    return Exchange(scope=scope, messages=[{"role": "user", "content": text}], reply=reply, at=at)


def config(*, api_key: str | None = CONFIG_KEY, **spool) -> MemoryConfig:
    spool = {"backoff_initial": 0.01, "backoff_max": 0.02, "poll_interval": 0.2, **spool}
    return MemoryConfig(llm=LLMConfig(api_key=api_key), spool=SpoolConfig(**spool))


@pytest.fixture
async def open_engine(tmp_path, embedder):
    opened = []

    async def open_engine(llm: ScriptedLLM, cfg: MemoryConfig | None = None, *, start=True):
        client = llm.client()
        engine = await MemoryEngine.open(
            cfg or config(),
            tmp_path / "data",
            default_base_url="http://llm.test/v1",
            http_client=client,
            embedder=embedder,
        )
        opened.append((engine, client))
        if start:
            await engine.start()
        return engine

    yield open_engine
    for engine, client in reversed(opened):
        await engine.close()
        await client.aclose()


async def texts(engine: MemoryEngine, scope: Scope) -> list[str]:
    return sorted(m.text for m in await engine.store.list(scope))


async def record(engine: MemoryEngine, scope: Scope, text: str, **kw):
    job_id = await engine.record_exchange(exchange(scope, text), **kw)
    return await engine.wait(job_id, timeout=30)


async def test_add_update_delete_and_none_are_applied(open_engine):
    llm = ScriptedLLM(
        [
            ops(
                {"op": "ADD", "text": "User lives in Berlin"},
                {"op": "ADD", "text": "User has a cat"},
            ),
            lambda call: ops(
                {"op": "UPDATE", "id": _alias(call, "Berlin"), "text": "User lives in Munich"}
            ),
            lambda call: ops({"op": "DELETE", "id": _alias(call, "cat")}),
            ops({"op": "NONE"}),
        ]
    )
    engine = await open_engine(llm)
    assert (await record(engine, ALICE, "I live in Berlin with my cat")).state == "done"
    assert await texts(engine, ALICE) == ["User has a cat", "User lives in Berlin"]
    assert (await record(engine, ALICE, "I moved to Munich")).state == "done"
    assert await texts(engine, ALICE) == ["User has a cat", "User lives in Munich"]
    assert (await record(engine, ALICE, "My cat is gone, forget it")).state == "done"
    assert await texts(engine, ALICE) == ["User lives in Munich"]
    assert (await record(engine, ALICE, "Hi!")).state == "done"
    assert await texts(engine, ALICE) == ["User lives in Munich"]
    # The replaced fact is still answerable, and its history tells the story.
    (munich,) = await engine.store.list(ALICE)
    events = [
        (h.event, h.old_text, h.new_text, h.actor)
        for h in await engine.store.history(ALICE, munich.id)
    ]
    assert ("UPDATE", "User lives in Berlin", "User lives in Munich", "extractor") in events
    assert await texts(engine, BOB) == []
    assert len(llm.calls) == 4


def _alias(call: Call, word: str) -> str:
    return next(m["id"] for m in call.memories if word in m["text"])


def counter_model(call: Call):
    """`set N` → keep exactly one fact "Counter is N", updating it if shown."""
    n = call.user_text().split()[-1]
    shown = [m for m in call.memories if m["text"].startswith("Counter is")]
    if shown:
        return ops({"op": "UPDATE", "id": shown[0]["id"], "text": f"Counter is {n}"})
    return ops({"op": "ADD", "text": f"Counter is {n}"})


async def test_one_users_jobs_apply_in_order_while_users_run_in_parallel(open_engine):
    llm = ScriptedLLM(responder=counter_model)
    engine = await open_engine(llm, config(concurrency=4))
    for n in range(1, 11):
        for scope in (ALICE, BOB):
            await engine.record_exchange(exchange(scope, f"set {n}", at=AT + timedelta(minutes=n)))
    assert await engine.drain(timeout=60)
    # Each extraction saw the state its predecessor left.
    assert [(c.user_text(), [m["text"] for m in c.memories]) for c in llm.calls][::2] == [
        (f"set {n}", [f"Counter is {n - 1}"] if n > 1 else []) for n in range(1, 11)
    ]
    # Sequential semantics: one fact per user, the last value, every step recorded once.
    assert await texts(engine, ALICE) == ["Counter is 10"]
    assert await texts(engine, BOB) == ["Counter is 10"]
    (fact,) = await engine.store.list(ALICE)
    values = [h.new_text for h in await engine.store.history(ALICE, fact.id)]
    assert values == [f"Counter is {n}" for n in range(1, 11)]
    assert (await engine.stats()).spool.done == 20


async def test_replaying_a_finished_job_changes_nothing_and_asks_no_model(open_engine, tmp_path):
    llm = ScriptedLLM([ops({"op": "ADD", "text": "User likes tea"})])
    engine = await open_engine(llm)
    job = await record(engine, ALICE, "I like tea")
    before = await engine.export(ALICE)
    # A crash after applying but before "done" was written: the job runs again.
    db = sqlite3.connect(tmp_path / "data" / "spool.sqlite3")
    with db:
        db.execute("UPDATE jobs SET state = 'pending' WHERE id = ?", (job.id,))
    db.close()
    engine.workers.notify()
    assert await engine.drain(timeout=30)
    assert await engine.export(ALICE) == before
    assert len(llm.calls) == 1


async def test_a_job_abandoned_after_its_decision_resumes_from_the_decision(open_engine):
    llm = ScriptedLLM([ops({"op": "ADD", "text": "User plays chess"})])
    engine = await open_engine(llm, config(lease_seconds=0.3), start=False)
    job_id = await engine.record_exchange(exchange(ALICE, "I play chess"))
    # A worker decides, stores the decision, and dies before applying it.
    dead = (await engine.spool.claim()).job
    await engine.spool.save_decision(dead, await engine.handler.decide(dead))
    await engine.start()
    info = await engine.wait(job_id, timeout=30)
    assert (info.state, info.attempts) == ("done", 2)
    assert await texts(engine, ALICE) == ["User plays chess"]
    assert len(llm.calls) == 1


async def test_a_chinese_fact_stays_chinese_end_to_end(open_engine):
    def model(call: Call):
        assert call.user_text() == "我下个月搬到上海，我最喜欢喝乌龙茶"
        return ops(
            {"op": "ADD", "text": "用户下个月搬到上海"}, {"op": "ADD", "text": "用户最喜欢喝乌龙茶"}
        )

    llm = ScriptedLLM(responder=model)
    engine = await open_engine(llm)
    assert (await record(engine, ALICE, "我下个月搬到上海，我最喜欢喝乌龙茶")).state == "done"
    assert await texts(engine, ALICE) == ["用户下个月搬到上海", "用户最喜欢喝乌龙茶"]
    assert "\\u" not in llm.calls[0].prompt
    hits = await engine.store.search(ALICE, "乌龙茶", min_score=0.0)
    assert hits[0].memory.text == "用户最喜欢喝乌龙茶"
    exported = "\n".join(await engine.export(ALICE))
    assert "用户最喜欢喝乌龙茶" in exported


async def test_with_the_real_local_embedder_a_chinese_fact_is_found(tmp_path, local_embedder):
    llm = ScriptedLLM(
        [
            ops(
                {"op": "ADD", "text": "用户对花生过敏"},
                {"op": "ADD", "text": "User drives a red Volvo"},
            )
        ]
    )
    client = llm.client()
    engine = await MemoryEngine.open(
        config(),
        tmp_path / "data",
        default_base_url="http://llm.test/v1",
        http_client=client,
        embedder=local_embedder,
    )
    try:
        await engine.start()
        assert (await record(engine, ALICE, "我对花生过敏。I drive a red Volvo.")).state == "done"
        hits = await engine.store.search(ALICE, "我有什么食物过敏？", limit=1, min_score=0.0)
        assert [h.memory.text for h in hits] == ["用户对花生过敏"]
    finally:
        await engine.close()
        await client.aclose()


@pytest.mark.parametrize(
    "answer",
    [
        "I'm sorry, I can't do that",
        '{"operations": [{"op": "DELETE", "id": "0"}, {"op": "ADD", "text": "User',
        '{"operations": [{"op": "DELETE", "id": "5"}]}',
        '{"operations": [{"op": "UPDATE", "id": "0", "text": 12}]}',
        '{"operations": [{"op": "DROP_TABLE", "id": "0"}]}',
    ],
)
async def test_untrustworthy_answers_are_retried_then_parked_without_damage(open_engine, answer):
    llm = ScriptedLLM(responder=lambda call: answer)
    engine = await open_engine(llm, config(max_attempts=3))
    await engine.add(ALICE, text="User lives in Berlin", infer=False)
    before = await engine.export(ALICE)
    info = await record(engine, ALICE, "I moved")
    assert (info.state, info.attempts) == ("failed", 3)
    assert info.last_error
    assert len(llm.calls) == 3
    assert await engine.export(ALICE) == before
    assert (await engine.stats()).spool.failed == 1
    # Once the model behaves, the parked job can be retried.
    llm.responder = lambda call: ops({"op": "UPDATE", "id": "0", "text": "User lives in Rome"})
    assert await engine.retry_failed("alice") == 1
    assert (await engine.wait(info.id, timeout=30)).state == "done"
    assert await texts(engine, ALICE) == ["User lives in Rome"]


@pytest.mark.parametrize("status", [503, 429])
async def test_an_extraction_outage_never_parks_jobs_however_long_it_lasts(open_engine, status):
    outage = {"error": {"message": "overloaded", "type": "server_error"}}
    llm = ScriptedLLM(responder=lambda call: httpx.Response(status, json=outage))
    engine = await open_engine(llm, config(max_attempts=2))
    job_id = await engine.record_exchange(exchange(ALICE, "I like jazz"))
    # Many more failed calls than max_attempts: the job still waits, nothing parked.
    while len(llm.calls) < 6:
        await asyncio.sleep(0.01)
    info = await engine.spool.get(job_id)
    assert info.state in ("pending", "running") and info.attempts <= 1
    assert (await engine.stats()).spool.failed == 0
    # The model comes back: the job drains.
    llm.responder = lambda call: ops({"op": "ADD", "text": "User likes jazz"})
    assert (await engine.wait(job_id, timeout=30)).state == "done"
    assert await texts(engine, ALICE) == ["User likes jazz"]


async def test_an_upstream_that_knows_only_plain_text_still_gets_facts(open_engine):
    answer = 'Here:\n```json\n{"operations": [{"op": "ADD", "text": "User is vegan"}]}\n```'
    llm = ScriptedLLM(responder=lambda call: answer, reject=("json_schema", "json_object"))
    engine = await open_engine(llm)
    assert (await record(engine, ALICE, "I'm vegan")).state == "done"
    assert (await record(engine, BOB, "I'm vegan too")).state == "done"
    assert await texts(engine, ALICE) == await texts(engine, BOB) == ["User is vegan"]
    # The refusals were paid once, then the working mode was remembered.
    assert [c.response_format for c in llm.rejected] == ["json_schema", "json_object"]


async def test_byok_jobs_wait_for_a_key_then_use_it_and_never_store_it(open_engine, tmp_path):
    user_key = "sk-user-ZZZZ0123456789abcdefghijklmn"
    llm = ScriptedLLM(responder=lambda call: ops({"op": "ADD", "text": "User likes jazz"}))
    engine = await open_engine(llm, config(api_key=None))
    job_id = await engine.record_exchange(exchange(ALICE, "I like jazz"))
    # No key known for alice (e.g. after a restart): the job waits, spending nothing.
    assert not await engine.drain(timeout=0.5)
    info = await engine.spool.get(job_id)
    assert (info.state, info.attempts, len(llm.calls)) == ("pending", 0, 0)
    # Blocked on a key is not behind: the extraction process's priority ignores it.
    assert await engine.spool.lag() >= 0.4
    assert await engine.extraction_lag() == 0
    # Her next request brings a key: both jobs run with it.
    second = await engine.record_exchange(exchange(ALICE, "Jazz again"), api_key=user_key)
    assert (await engine.wait(second, timeout=30)).state == "done"
    assert (await engine.spool.get(job_id)).state == "done"
    assert {c.authorization for c in llm.calls} == {f"Bearer {user_key}"}
    await engine.close()
    for f in (tmp_path / "data").glob("spool.sqlite3*"):
        assert user_key.encode() not in f.read_bytes()


async def test_secrets_in_conversations_never_reach_the_model_or_the_spool(open_engine, tmp_path):
    secret = "sk-proj-SECRETabcdefghijklmnop0123456789"
    llm = ScriptedLLM(responder=lambda call: ops({"op": "ADD", "text": f"User's key is {secret}"}))
    engine = await open_engine(llm)
    info = await record(engine, ALICE, f"my openai key is {secret}, password: hunter2")
    assert info.state == "done"
    for call in llm.calls:
        assert secret not in str(call.body) and "hunter2" not in str(call.body)
    # Even a model that echoes a secret does not get it stored.
    assert await texts(engine, ALICE) == ["User's key is [REDACTED]"]
    await engine.close()
    for f in (tmp_path / "data").glob("spool.sqlite3*"):
        data = f.read_bytes()
        assert secret.encode() not in data and CONFIG_KEY.encode() not in data
        assert b"hunter2" not in data


async def test_an_upstream_error_echoing_the_key_is_stored_without_it(open_engine, tmp_path):
    echo = {"error": {"message": f"Incorrect API key provided: {CONFIG_KEY}."}}
    llm = ScriptedLLM(responder=lambda call: httpx.Response(401, json=echo))
    engine = await open_engine(llm, config(max_attempts=1))
    info = await record(engine, ALICE, "I like jazz")
    assert info.state == "failed"
    assert "401" in info.last_error and "[REDACTED]" in info.last_error
    assert CONFIG_KEY not in info.last_error
    await engine.close()
    for f in (tmp_path / "data").glob("spool.sqlite3*"):
        assert CONFIG_KEY.encode() not in f.read_bytes()


async def test_delete_all_forgets_memories_history_and_queued_jobs(open_engine):
    llm = ScriptedLLM(responder=lambda call: ops({"op": "ADD", "text": "User likes jazz"}))
    engine = await open_engine(llm, config(api_key=None))
    (m,) = (await engine.add(ALICE, text="User lives in Berlin", infer=False)).memories
    await engine.add(BOB, text="User lives in Paris", infer=False)
    await engine.record_exchange(exchange(ALICE, "I like jazz"))  # waits: no key yet
    assert (await engine.stats()).spool.pending == 1
    assert await engine.delete_all(ALICE) == 1
    assert await engine.store.list(ALICE) == []
    assert await engine.store.history(ALICE, m.id) == []
    assert await engine.jobs(user_id="alice") == []
    # The key arrives later: there is nothing left to run for alice.
    engine.provide_key("alice", "sk-user-abcdefghijklmnopqrstuvwxyz")
    assert await engine.drain(timeout=30)
    assert await engine.store.list(ALICE) == [] and llm.calls == []
    assert await texts(engine, BOB) == ["User lives in Paris"]


async def test_delete_all_during_a_running_extraction_leaves_nothing_behind(open_engine):
    llm = ScriptedLLM(responder=lambda call: ops({"op": "ADD", "text": "User likes jazz"}))
    llm.hold()
    engine = await open_engine(llm)
    await engine.record_exchange(exchange(ALICE, "I like jazz"))
    await llm.entered.wait()
    await engine.delete_all(ALICE)
    llm.release()
    assert await engine.drain(timeout=30)
    assert await engine.store.list(ALICE) == []
    assert await engine.jobs() == []


async def test_an_erase_in_another_process_during_a_jobs_write_leaves_nothing_behind(
    open_engine, monkeypatch
):
    """The job checked it still held its claim, then its user was erased
    elsewhere (another worker, or the serving process beside the extraction
    process) before its write landed."""
    llm = ScriptedLLM(responder=lambda call: ops({"op": "ADD", "text": "User likes jazz"}))
    worker = await open_engine(llm)
    serving = await open_engine(ScriptedLLM([]), start=False)  # the same data directory
    at_write, go = asyncio.Event(), asyncio.Event()
    apply = worker.store.apply
    written = []

    async def write_later(*args, **kwargs):
        at_write.set()
        await go.wait()
        entries = await apply(*args, **kwargs)
        written.extend(entries)
        return entries

    monkeypatch.setattr(worker.store, "apply", write_later)
    await serving.record_exchange(exchange(ALICE, "I like jazz"))
    await asyncio.wait_for(at_write.wait(), 30)
    await serving.delete_all(ALICE)
    finished = asyncio.ensure_future(worker.workers.changed(30))
    go.set()
    await finished
    assert [e.new_text for e in written] == ["User likes jazz"]  # it did land
    assert await serving.store.list(ALICE) == [] and await worker.store.list(ALICE) == []
    assert await serving.store.history(ALICE, written[0].memory_id) == []
    assert await serving.jobs() == []


async def test_closing_gives_a_running_job_back_and_a_restart_finishes_it(open_engine):
    slow = ScriptedLLM(responder=lambda call: ops({"op": "ADD", "text": "User likes jazz"}))
    slow.hold()
    engine = await open_engine(slow)
    job_id = await engine.record_exchange(exchange(ALICE, "I like jazz"))
    await slow.entered.wait()
    await engine.close()
    slow.release()
    fresh = ScriptedLLM(responder=lambda call: ops({"op": "ADD", "text": "User likes jazz"}))
    engine = await open_engine(fresh)
    info = await engine.wait(job_id, timeout=30)
    assert (info.state, info.attempts) == ("done", 1)
    assert await texts(engine, ALICE) == ["User likes jazz"]


async def test_add_verbatim_or_by_inference(open_engine):
    llm = ScriptedLLM([ops({"op": "ADD", "text": "User has two kids"})])
    engine = await open_engine(llm)
    direct = await engine.add(ALICE, text="My PIN is 1234", infer=False, metadata={"src": "ui"})
    assert [(m.text, m.metadata) for m in direct.memories] == [
        ("My PIN is [REDACTED]", {"src": "ui"})
    ]
    inferred = await engine.add(ALICE, messages=[{"role": "user", "content": "I have two kids"}])
    assert inferred.memories == [] and inferred.job_id
    assert (await engine.wait(inferred.job_id, timeout=30)).state == "done"
    assert await texts(engine, ALICE) == ["My PIN is [REDACTED]", "User has two kids"]
    with pytest.raises(ValueError):
        await engine.add(ALICE, infer=False)


async def test_metadata_given_to_an_inferred_add_goes_on_the_facts_it_adds(open_engine):
    llm = ScriptedLLM(
        [
            ops({"op": "ADD", "text": "User has two kids"}),
            lambda call: ops(
                {"op": "UPDATE", "id": _alias(call, "kids"), "text": "User has three kids"},
                {"op": "ADD", "text": "User lives in Lyon"},
            ),
        ]
    )
    engine = await open_engine(llm)
    first = await engine.add(
        ALICE, messages=[{"role": "user", "content": "I have two kids"}], metadata={"src": "crm"}
    )
    assert (await engine.wait(first.job_id, timeout=30)).state == "done"
    second = await engine.add(
        ALICE,
        messages=[{"role": "user", "content": "Three kids now, and we live in Lyon"}],
        metadata={"src": "import"},
    )
    assert (await engine.wait(second.job_id, timeout=30)).state == "done"
    # An update keeps the memory's metadata; a new fact gets its add's.
    assert sorted((m.text, m.metadata) for m in await engine.store.list(ALICE)) == [
        ("User has three kids", {"src": "crm"}),
        ("User lives in Lyon", {"src": "import"}),
    ]


async def test_the_extraction_client_is_built_at_start_not_by_the_first_job(open_engine):
    """Building it (the SDK's import included) took ~0.7 s of the event loop
    in the first job, under the next request's feet."""
    engine = await open_engine(ScriptedLLM([]), start=False)
    assert engine.extractor._client is None
    await engine.start()
    assert engine.extractor._client is not None


async def test_export_and_import_move_a_users_memories(open_engine):
    engine = await open_engine(ScriptedLLM())
    await engine.add(ALICE, text="User lives in Berlin", infer=False)
    await engine.add(ALICE, text="用户喜欢乌龙茶", infer=False)
    lines = await engine.export(ALICE)
    assert len(lines) == 2
    assert (await engine.import_lines(BOB, lines)).imported == 2
    again = await engine.import_lines(BOB, ["", *lines])
    assert [(i.line, i.reason) for i in again.skipped] == [
        (2, "already_present"),
        (3, "already_present"),
    ]
    assert await engine.import_lines(Scope(user_id="carol"), []) == ImportResult()
    with pytest.raises(ValueError, match="line 1"):
        await engine.import_lines(BOB, ["not json"])


async def test_stats_and_readiness(open_engine):
    engine = await open_engine(ScriptedLLM())
    assert await engine.ready()
    await engine.add(ALICE, text="User lives in Berlin", infer=False)
    await engine.add(BOB, text="User lives in Paris", infer=False)
    stats = await engine.stats()
    assert (stats.memories, stats.users, stats.spool.pending) == (2, 2, 0)


class RecordingHandoff:
    """Stands in for the socket to the extraction process."""

    def __init__(self) -> None:
        self.sent: list[tuple[str | None, str | None]] = []

    def send(self, user_id=None, api_key=None, embedded=None) -> None:
        self.sent.append((user_id, api_key))


async def test_each_exchange_is_one_message_to_the_extraction_process_key_included(
    tmp_path, embedder
):
    """A user's first exchange used to send the key twice (once on learning
    it, once with the wake-up): now every exchange is one message, which
    carries the key (an extraction process that restarted learns it back)."""
    llm = ScriptedLLM()
    client = llm.client()
    handoff = RecordingHandoff()
    engine = await MemoryEngine.open(
        config(api_key=None),
        tmp_path / "data",
        default_base_url="http://llm.test/v1",
        http_client=client,
        embedder=embedder,
        handoff=handoff,  # type: ignore[arg-type]
    )
    await engine.start()
    try:
        await engine.record_exchange(exchange(ALICE, "I like jazz"), api_key="sk-alice")
        assert handoff.sent == [("alice", "sk-alice")]
        await engine.record_exchange(exchange(ALICE, "And blues"), api_key="sk-alice")
        assert handoff.sent == [("alice", "sk-alice")] * 2
        # A request that records nothing (read mode) hands a new key over alone.
        engine.provide_key("alice", "sk-alice-new")
        assert handoff.sent[-1] == ("alice", "sk-alice-new")
    finally:
        await engine.close()
        await client.aclose()
