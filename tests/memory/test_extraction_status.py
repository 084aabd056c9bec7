"""What the extraction monitor (memory/extraction_status.py) reports: the
stats' `extraction` section, read from the spool's recent outcomes and the
job process's state file, and the failing flag chats read without waiting."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import cast

import pytest
from msgspec.structs import replace

import memory.extraction_status
from memory.config import LLMConfig, MemoryConfig
from memory.extraction import Extractor, Probe
from memory.extraction_keys import ExtractionKeys
from memory.extraction_state import ExtractionState
from memory.extraction_status import STATUS_IDLE_SECONDS, ExtractionMonitor
from memory.models import LastError
from memory.spool import Outcomes, Spool

ENDPOINT = "http://llm.test/v1"
NEVER_TRIED = Outcomes(
    last_success_at=None,
    last_error=None,
    last_error_reason=None,
    last_error_at=None,
    failing=False,
)


class FakeSpool:
    """The two reads the monitor makes of the spool, answered from `now`
    and `by_reason`; every window it is asked about is recorded."""

    def __init__(self) -> None:
        self.now = NEVER_TRIED
        self.by_reason: dict[str, dict[str, int]] = {"pending": {}, "failed": {}}
        self.windows: list[float] = []
        self.broken = False

    async def outcomes(self, window: float) -> Outcomes:
        self.windows.append(window)
        if self.broken:
            raise OSError("database is locked")
        return self.now

    async def reasons(self) -> dict[str, dict[str, int]]:
        return self.by_reason


class Clock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def spool() -> FakeSpool:
    return FakeSpool()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def no_pause(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Background reads follow each other with no pause (normally a second)."""
    monkeypatch.setattr(memory.extraction_status, "STATUS_CACHE_SECONDS", 0.0)
    yield


@pytest.fixture
async def make_monitor(
    spool: FakeSpool, clock: Clock
) -> AsyncIterator[Callable[..., ExtractionMonitor]]:
    """Builds monitors over `spool` and `clock`; closes them after the test."""
    made: list[ExtractionMonitor] = []

    def make(
        *,
        base_url: str = ENDPOINT,
        api_key: str | None = "sk-configured",
        key_source: str | None = "memory.llm.api_key",
        state_path: Path | None = None,
        failing_window_seconds: float = 300.0,
        probed: Probe | None = None,
    ) -> ExtractionMonitor:
        config = MemoryConfig(
            llm=LLMConfig(
                base_url=base_url,
                model="small-model",
                api_key=api_key,
                failing_window_seconds=failing_window_seconds,
            )
        )
        extractor = Extractor(config)
        extractor.probed = probed
        keys = ExtractionKeys(api_key, extractor, handoff=None, wake=lambda: None)
        monitor = ExtractionMonitor(
            config,
            cast(Spool, spool),
            extractor,
            keys,
            key_source=key_source,
            state_path=state_path,
            clock=clock,
        )
        made.append(monitor)
        return monitor

    yield make
    for monitor in made:
        await monitor.close()


async def settle(until: Callable[[], bool] = lambda: False, turns: int = 50) -> None:
    """Let background tasks run for a few event-loop turns (no wall-clock wait)."""
    for _ in range(turns):
        if until():
            return
        await asyncio.sleep(0)


def at(unix: float) -> datetime:
    return datetime.fromtimestamp(unix, UTC)


# ---------- status(): ok, failing, idle ----------


async def test_with_no_job_tried_yet_extraction_is_idle(make_monitor):
    status = await make_monitor().status()
    assert (status.status, status.last_success_at, status.last_error) == ("idle", None, None)


async def test_a_success_makes_it_ok_and_is_reported_with_its_time(make_monitor, spool):
    spool.now = Outcomes(
        last_success_at=1_700_000_000.0,
        last_error=None,
        last_error_reason=None,
        last_error_at=None,
        failing=False,
    )
    status = await make_monitor().status()
    assert status.status == "ok"
    assert status.last_success_at == at(1_700_000_000.0)


async def test_an_error_outside_the_failing_window_leaves_it_ok_and_is_still_reported(
    make_monitor, spool
):
    spool.now = Outcomes(
        last_success_at=None,
        last_error="extraction model answered 503: overloaded",
        last_error_reason="unavailable",
        last_error_at=1_700_000_100.0,
        failing=False,
    )
    status = await make_monitor().status()
    assert status.status == "ok"
    assert status.last_error == LastError(
        message="extraction model answered 503: overloaded",
        reason="unavailable",
        at=at(1_700_000_100.0),
    )


async def test_failures_with_no_success_in_the_window_make_it_failing(make_monitor, spool):
    spool.now = Outcomes(
        last_success_at=1_700_000_000.0,
        last_error="extraction model 'small-model' not found",
        last_error_reason="model_not_found",
        last_error_at=1_700_000_400.0,
        failing=True,
    )
    status = await make_monitor().status()
    assert status.status == "failing"
    assert status.last_success_at == at(1_700_000_000.0)
    assert status.last_error is not None and status.last_error.reason == "model_not_found"


async def test_outcomes_are_read_over_the_configured_failing_window(make_monitor, spool):
    await make_monitor(failing_window_seconds=42.0).status()
    assert spool.windows == [42.0]


async def test_jobs_by_reason_are_the_spools_counts(make_monitor, spool):
    spool.by_reason = {"pending": {"no_key": 3}, "failed": {"context_length": 1}}
    status = await make_monitor().status()
    assert status.jobs_by_reason == {"pending": {"no_key": 3}, "failed": {"context_length": 1}}


# ---------- status(): the endpoint, model, mode and key ----------


async def test_the_endpoint_is_shown_without_credentials_or_query(make_monitor):
    monitor = make_monitor(base_url="http://user:secret@llm.test/v1?token=abc")
    assert (await monitor.status()).endpoint == ENDPOINT


async def test_without_a_state_file_the_configured_model_and_no_mode_are_shown(make_monitor):
    status = await make_monitor().status()
    assert (status.model, status.mode) == ("small-model", None)


async def test_the_model_and_mode_the_job_process_saved_for_this_endpoint_are_shown(
    make_monitor, tmp_path
):
    path = tmp_path / "extraction-state.json"
    state = ExtractionState(path)
    state.use(ENDPOINT, "learned-model")
    state.set_mode(ENDPOINT, "learned-model", "json_object")
    await state.save()
    status = await make_monitor(state_path=path).status()
    assert (status.model, status.mode) == ("learned-model", "json_object")


async def test_a_state_file_saved_for_another_endpoint_is_ignored(make_monitor, tmp_path):
    path = tmp_path / "extraction-state.json"
    state = ExtractionState(path)
    state.use("http://elsewhere.test/v1", "other-model")
    state.set_mode("http://elsewhere.test/v1", "other-model", "text")
    await state.save()
    status = await make_monitor(state_path=path).status()
    assert (status.model, status.mode) == ("small-model", None)


async def test_the_key_source_is_reported_as_given(make_monitor):
    status = await make_monitor(key_source="upstream openai").status()
    assert status.key_source == "upstream openai"


async def test_an_endpoint_that_answered_without_a_key_needs_none_when_none_is_configured(
    make_monitor,
):
    probed = Probe(model="small-model", models=["small-model"], open=True, error=None)
    status = await make_monitor(api_key=None, key_source=None, probed=probed).status()
    assert status.key_source is not None
    assert status.key_source.startswith("none needed")


async def test_an_endpoint_that_wanted_a_key_shows_where_keys_come_from(make_monitor):
    probed = Probe(model="small-model", models=None, open=False, error="401 Unauthorized")
    status = await make_monitor(api_key=None, key_source="users' own keys", probed=probed).status()
    assert status.key_source == "users' own keys"


async def test_a_configured_key_is_reported_even_where_the_endpoint_is_open(make_monitor):
    probed = Probe(model="small-model", models=["small-model"], open=True, error=None)
    status = await make_monitor(key_source="memory.llm.api_key", probed=probed).status()
    assert status.key_source == "memory.llm.api_key"


# ---------- failing(): the flag chats read ----------


async def test_a_chat_gets_the_last_reading_at_once_and_a_fresh_one_soon_after(make_monitor, spool):
    spool.now = replace(NEVER_TRIED, failing=True)
    monitor = make_monitor()
    assert monitor.failing() is False  # nothing read yet: no waiting on the spool
    await settle(until=lambda: bool(spool.windows))
    assert monitor.failing() is True


async def test_a_status_read_updates_the_flag_chats_read(make_monitor, spool):
    spool.now = replace(NEVER_TRIED, failing=True)
    monitor = make_monitor()
    await monitor.status()
    assert monitor.failing() is True


async def test_the_background_reads_use_the_failing_window_too(make_monitor, spool):
    monitor = make_monitor(failing_window_seconds=7.0)
    monitor.failing()
    await settle(until=lambda: bool(spool.windows))
    assert spool.windows == [7.0]


async def test_reading_rests_after_a_minute_without_a_chat_and_resumes_with_the_next(
    make_monitor, spool, clock, no_pause
):
    monitor = make_monitor()
    monitor.failing()
    await settle(until=lambda: len(spool.windows) >= 3)
    assert len(spool.windows) >= 3  # read again and again while chats ask

    clock.now += STATUS_IDLE_SECONDS
    await settle()
    resting = len(spool.windows)
    await settle()
    assert len(spool.windows) == resting

    monitor.failing()
    await settle(until=lambda: len(spool.windows) > resting)
    assert len(spool.windows) > resting


async def test_an_unreadable_spool_keeps_the_last_reading(make_monitor, spool, no_pause, caplog):
    spool.now = replace(NEVER_TRIED, failing=True)
    monitor = make_monitor()
    await monitor.status()
    spool.broken = True
    monitor.failing()
    reads = len(spool.windows)
    await settle(until=lambda: len(spool.windows) > reads)
    assert monitor.failing() is True
    assert "reading the extraction status failed" in caplog.text


async def test_after_close_chats_start_no_reading(make_monitor, spool):
    monitor = make_monitor()
    await monitor.close()
    assert monitor.failing() is False
    await settle()
    assert spool.windows == []


async def test_close_stops_the_background_reading(make_monitor, spool, no_pause):
    monitor = make_monitor()
    monitor.failing()
    await settle(until=lambda: bool(spool.windows))
    await monitor.close()
    stopped = len(spool.windows)
    await settle()
    assert len(spool.windows) == stopped
