"""The spool: durable, strictly ordered per user, parallel across users, crash-safe."""

import asyncio
import json
import subprocess
import sys
import textwrap
import time

import pytest

from memory.models import Operation
from memory.spool import Spool
from tests.memory.helpers import exchange


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture(params=["sqlite", "postgres"])
async def open_spool(request, tmp_path, clock):
    """Opens the backend's queue (SQLite: one file; PostgreSQL: one database
    on the session's server); every spool it opened is closed after the test.
    Another call opens another connection to the same queue."""
    opened = []
    if request.param == "postgres":
        from memory.spool_postgres import PostgresSpool

        url = request.getfixturevalue("postgres_url")

        async def open_(clock=clock):
            return await PostgresSpool.open(url, lease_seconds=30, clock=clock)
    else:

        async def open_(clock=clock):
            return await Spool.open(tmp_path / "spool.sqlite3", lease_seconds=30, clock=clock)

    async def opener(clock=clock):
        s = await open_(clock)
        opened.append(s)
        return s

    yield opener
    for s in reversed(opened):
        await s.close()


@pytest.fixture
async def spool(open_spool):
    """The queue, on each backend: these tests are its contract."""
    return await open_spool()


# For what only the SQLite file has (pragmas, file locks, processes on one file).
sqlite_only = pytest.mark.parametrize("open_spool", ["sqlite"], indirect=True)


async def test_an_enqueued_exchange_is_durable_and_comes_back_intact(open_spool, spool):
    job_id = await spool.enqueue(exchange("u", "我喜欢乌龙茶"))
    # Another connection (another process, or this one after a restart) sees it.
    other = await open_spool(time.time)
    claim = await other.claim()
    assert claim.job is not None
    assert claim.job.id == job_id
    assert claim.job.exchange == exchange("u", "我喜欢乌龙茶")
    assert claim.job.attempts == 1


@sqlite_only
async def test_the_database_is_wal_with_full_sync(tmp_path, spool):
    import sqlite3

    db = sqlite3.connect(tmp_path / "spool.sqlite3")
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    db.close()
    assert spool._conn().execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL


@sqlite_only
async def test_a_write_waits_for_another_process_holding_the_lock(tmp_path, spool):
    import sqlite3
    import threading

    other = sqlite3.connect(
        tmp_path / "spool.sqlite3", isolation_level=None, check_same_thread=False
    )
    other.execute("BEGIN IMMEDIATE")  # another process mid-transaction
    threading.Timer(0.3, other.rollback).start()
    await spool.enqueue(exchange("u"))  # waits for it instead of failing
    other.close()
    assert (await spool.stats()).pending == 1
    # The usual busy timeout applies to every other statement again.
    assert spool._conn().execute("PRAGMA busy_timeout").fetchone()[0] == 30_000


@sqlite_only
async def test_a_write_gives_up_when_the_lock_is_never_released(tmp_path, spool, monkeypatch):
    import sqlite3

    monkeypatch.setattr(spool._writer, "busy_timeout_ms", 200)
    other = sqlite3.connect(tmp_path / "spool.sqlite3", isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    try:
        with pytest.raises(sqlite3.OperationalError, match="locked"):
            await spool.enqueue(exchange("u"))
    finally:
        other.close()
    await spool.enqueue(exchange("u"))  # and works once it is
    assert (await spool.stats()).pending == 1


async def test_one_user_is_strictly_serial_and_users_run_in_parallel(spool):
    a1 = await spool.enqueue(exchange("alice", "1"))
    a2 = await spool.enqueue(exchange("alice", "2"))
    b1 = await spool.enqueue(exchange("bob", "1"))
    first = (await spool.claim()).job
    second = (await spool.claim()).job
    assert (first.id, second.id) == (a1, b1)
    # alice's next job waits for her first one.
    assert (await spool.claim()).job is None
    assert await spool.complete(first)
    third = (await spool.claim()).job
    assert third.id == a2


async def test_a_job_in_backoff_holds_back_the_users_later_jobs(spool, clock):
    a1 = await spool.enqueue(exchange("alice", "1"))
    await spool.enqueue(exchange("alice", "2"))
    job = (await spool.claim()).job
    await spool.fail(job, "model said nonsense", retry_in=10)
    claim = await spool.claim()
    assert claim.job is None
    assert claim.wait == pytest.approx(10)
    clock.now += 10
    again = (await spool.claim()).job
    assert again.id == a1
    assert again.attempts == 2
    info = await spool.get(a1)
    assert info.last_error == "model said nonsense"


async def test_a_parked_failure_keeps_its_error_and_no_longer_blocks_the_user(spool):
    a1 = await spool.enqueue(exchange("alice", "1"))
    a2 = await spool.enqueue(exchange("alice", "2"))
    await spool.fail((await spool.claim()).job, "unknown id '7'", retry_in=None)
    assert (await spool.claim()).job.id == a2
    failed = await spool.jobs(state="failed")
    assert [(j.id, j.last_error) for j in failed] == [(a1, "unknown id '7'")]
    assert await spool.retry_failed("alice") == 1
    info = await spool.get(a1)
    assert (info.state, info.attempts) == ("pending", 0)


async def test_an_expired_lease_lets_another_worker_resume_the_job(spool, clock):
    job_id = await spool.enqueue(exchange("alice"))
    crashed = (await spool.claim()).job
    await spool.save_decision(crashed, [Operation(op="ADD", text="User likes tea")])
    clock.now += 29
    assert (await spool.claim()).job is None  # lease still live
    clock.now += 2
    resumed = (await spool.claim()).job
    assert resumed.id == job_id
    # The decision survived: the resumed job will not ask the model again.
    assert resumed.decision == [Operation(op="ADD", text="User likes tea")]
    # The crashed worker, should it wake up, can no longer touch the job.
    assert not await spool.complete(crashed)
    assert not await spool.heartbeat(crashed)
    assert not await spool.owns(crashed)
    assert await spool.owns(resumed)
    assert await spool.complete(resumed)
    assert (await spool.get(job_id)).state == "done"


async def test_heartbeats_keep_a_long_job_leased(spool, clock):
    await spool.enqueue(exchange("alice"))
    job = (await spool.claim()).job
    for _ in range(5):
        clock.now += 20
        assert await spool.heartbeat(job)
    assert (await spool.claim()).job is None


async def test_release_gives_the_job_back_without_spending_an_attempt(spool):
    job_id = await spool.enqueue(exchange("alice"))
    job = (await spool.claim()).job
    assert await spool.release(job)
    again = (await spool.claim()).job
    assert (again.id, again.attempts) == (job_id, 1)


async def test_claims_can_be_limited_to_some_users(spool):
    await spool.enqueue(exchange("no-key-yet"))
    b = await spool.enqueue(exchange("bob"))
    assert (await spool.claim(users=[])).job is None
    assert (await spool.claim(users=["bob", "carol"])).job.id == b


async def test_deleting_a_user_removes_all_their_jobs_only(spool):
    await spool.enqueue(exchange("alice", agent="a1"))
    await spool.enqueue(exchange("alice", agent="a2"))
    await spool.enqueue(exchange("alice"))
    await spool.enqueue(exchange("alice'; DROP TABLE jobs; --"))
    bob = await spool.enqueue(exchange("bob"))
    await spool.claim()  # a running job is deleted too
    assert await spool.delete_user("alice", "a2") == 1
    assert await spool.delete_user("alice") == 2
    remaining = await spool.jobs()
    assert sorted(j.user_id for j in remaining) == ["alice'; DROP TABLE jobs; --", "bob"]
    assert bob in {j.id for j in remaining}


async def test_done_jobs_are_purged_after_the_retention(spool, clock):
    await spool.enqueue(exchange("alice"))
    await spool.complete((await spool.claim()).job)
    clock.now += 100
    assert await spool.purge(older_than=200) == 0
    assert await spool.purge(older_than=50) == 1
    assert (await spool.stats()).done == 0


async def test_stats_count_each_state(spool):
    for user in ("a", "b", "c", "d"):
        await spool.enqueue(exchange(user))
    await spool.complete((await spool.claim()).job)
    await spool.fail((await spool.claim()).job, "x", retry_in=None)
    await spool.claim()
    stats = await spool.stats()
    assert (stats.pending, stats.running, stats.failed, stats.done) == (1, 1, 1, 1)
    assert await spool.unfinished() == 2
    assert stats.lag_seconds == 0  # the test clock stands still


async def test_lag_is_how_long_the_oldest_due_job_has_waited(spool, clock):
    assert await spool.lag() == 0
    first = await spool.enqueue(exchange("alice", "1"))
    clock.now += 3
    await spool.enqueue(exchange("bob", "1"))
    clock.now += 4
    assert await spool.lag() == pytest.approx(7)
    assert await spool.lag(users=["bob", "carol"]) == pytest.approx(4)
    assert await spool.lag(users=[]) == 0
    # A running job no longer waits; a job in backoff waits only once it is due again.
    job = (await spool.claim()).job
    assert job.id == first
    assert await spool.lag() == pytest.approx(4)
    await spool.fail(job, "model down", retry_in=10)
    assert await spool.lag() == pytest.approx(4)
    await spool.complete((await spool.claim()).job)
    assert await spool.lag() == 0
    clock.now += 12
    assert await spool.lag() == pytest.approx(2)


CLAIMER = textwrap.dedent(
    """
    import asyncio, json, sys
    from pathlib import Path
    from memory.spool import Spool

    async def main():
        spool = await Spool.open(Path(sys.argv[1]))
        seen = []
        idle = 0
        while idle < 20:
            claim = await spool.claim()
            if claim.job is None:
                idle += 1
                await asyncio.sleep(0.01)
                continue
            idle = 0
            seen.append([claim.job.id, claim.job.user_id])
            await spool.complete(claim.job)
        await spool.close()
        print(json.dumps(seen))

    asyncio.run(main())
    """
)


@sqlite_only
async def test_claims_are_atomic_across_processes(tmp_path, spool):
    path = tmp_path / "spool.sqlite3"
    ids = [await spool.enqueue(exchange(f"user{i % 3}", str(i))) for i in range(45)]
    procs = [
        await asyncio.create_subprocess_exec(
            sys.executable, "-c", CLAIMER, str(path), stdout=subprocess.PIPE
        )
        for _ in range(3)
    ]
    outputs = [json.loads((await p.communicate())[0]) for p in procs]
    claimed = [job_id for out in outputs for job_id, _ in out]
    # Every job exactly once, none lost, none doubled.
    assert sorted(claimed) == sorted(ids)
    stats = await spool.stats()
    assert (stats.done, stats.pending, stats.running) == (45, 0, 0)


async def test_a_job_says_why_it_waits_until_it_is_claimed(spool):
    job_id = await spool.enqueue(exchange("u", "hi"), reason="no_key")
    assert (await spool.get(job_id)).reason == "no_key"
    assert await spool.reasons() == {"pending": {"no_key": 1}, "failed": {}}
    claim = await spool.claim()
    assert (await spool.get(job_id)).reason is None
    await spool.release(claim.job, reason="no_key")
    assert (await spool.get(job_id)).reason == "no_key"


async def test_a_failure_records_its_category_and_success_clears_it(spool):
    job_id = await spool.enqueue(exchange("u", "hi"))
    job = (await spool.claim()).job
    await spool.fail(job, "unreachable", retry_in=0, counted=False, reason="model_unavailable")
    assert (await spool.get(job_id)).reason == "model_unavailable"
    job = (await spool.claim()).job
    await spool.fail(job, "no such model", retry_in=None, reason="model_not_found")
    info = await spool.get(job_id)
    assert (info.state, info.reason) == ("failed", "model_not_found")
    assert await spool.reasons() == {"pending": {}, "failed": {"model_not_found": 1}}
    await spool.retry_failed()
    job = (await spool.claim()).job
    await spool.complete(job)
    assert (await spool.get(job_id)).reason is None


async def test_outcomes_say_failing_only_while_recent_jobs_fail_and_none_succeeds(spool, clock):
    assert (await spool.outcomes(300)).failing is False
    await spool.enqueue(exchange("u", "one"))
    job = (await spool.claim()).job
    await spool.fail(job, "boom", retry_in=100, reason="invalid_answer")
    outcomes = await spool.outcomes(300)
    assert outcomes.failing is True
    assert (outcomes.last_error, outcomes.last_error_reason) == ("boom", "invalid_answer")
    assert outcomes.last_error_at == clock.now and outcomes.last_success_at is None
    # Out of the window: no longer counted as failing, still the last error.
    clock.now += 301
    assert (await spool.outcomes(300)).failing is False
    await spool.enqueue(exchange("v", "two"))
    job = (await spool.claim(users=["v"])).job
    await spool.fail(job, "boom again", retry_in=100)
    assert (await spool.outcomes(300)).failing is True
    await spool.enqueue(exchange("w", "three"))
    job = (await spool.claim(users=["w"])).job
    await spool.complete(job)
    outcomes = await spool.outcomes(300)
    assert outcomes.failing is False and outcomes.last_success_at == clock.now


async def test_waiting_jobs_are_marked_except_those_of_users_with_a_key(spool):
    a = await spool.enqueue(exchange("a", "x"))
    b = await spool.enqueue(exchange("b", "x"))
    assert await spool.mark_waiting("no_key", except_users=["b"]) == 1
    assert [(await spool.get(i)).reason for i in (a, b)] == ["no_key", None]


async def test_the_decision_of_a_job_is_readable(spool):
    job_id = await spool.enqueue(exchange("u", "x"))
    assert await spool.decision(job_id) == []
    job = (await spool.claim()).job
    ops = [Operation(op="ADD", text="Likes tea")]
    await spool.save_decision(job, ops)
    assert await spool.decision(job_id) == ops
    assert await spool.decision("missing") is None


async def test_a_spool_made_before_reasons_existed_gains_the_column(tmp_path):
    import sqlite3

    path = tmp_path / "old.sqlite3"
    db = sqlite3.connect(path)
    db.execute(
        "CREATE TABLE jobs (seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL UNIQUE,"
        " user_id TEXT NOT NULL, agent_id TEXT, session_id TEXT, payload BLOB NOT NULL,"
        " state TEXT NOT NULL, attempts INTEGER NOT NULL DEFAULT 0, next_attempt_at REAL NOT NULL,"
        " lease_owner TEXT, lease_until REAL, last_error TEXT, decision BLOB,"
        " created_at REAL NOT NULL, updated_at REAL NOT NULL)"
    )
    db.commit()
    db.close()
    spool = await Spool.open(path)
    try:
        job_id = await spool.enqueue(exchange("u", "x"), reason="no_key")
        assert (await spool.get(job_id)).reason == "no_key"
    finally:
        await spool.close()


async def test_a_parked_job_put_back_waits_while_a_later_one_runs(spool):
    first = await spool.enqueue(exchange("alice", "1"))
    await spool.enqueue(exchange("alice", "2"))
    await spool.fail((await spool.claim()).job, "bad answer", retry_in=None)
    second = (await spool.claim()).job
    assert await spool.retry_failed("alice") == 1
    # The older job is the head again, but the user already has a job running:
    # it comes due when that job's lease ends.
    claim = await spool.claim()
    assert claim.job is None
    assert claim.wait == pytest.approx(30)
    assert await spool.complete(second)
    assert (await spool.claim()).job.id == first
