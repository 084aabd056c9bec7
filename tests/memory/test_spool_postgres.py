"""The PostgreSQL queue as replicas on several machines share it: what the
contract tests in test_spool.py cannot show with one connection.

Each `PostgresSpool` here stands for one replica (its own pool of
connections); they share a database on the session's server
(tests/postgres.py).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time

import msgspec
import psycopg
import pytest

from memory import spool_postgres
from memory.config import MemoryConfig, QueueConfig
from memory.engine import MemoryEngine
from memory.models import Operation
from memory.spool_postgres import AdvisoryLock, PostgresSpool, Target, masked_url
from tests.memory.helpers import HashEmbedder, exchange
from tests.postgres import PASSWORD, PostgresServer


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def replicas(postgres_url, clock):
    """Opens replicas of one queue, all on `clock`; closed after the test."""
    opened: list[PostgresSpool] = []

    async def open_(*, clock=clock) -> PostgresSpool:
        spool = await PostgresSpool.open(postgres_url, lease_seconds=30, clock=clock)
        opened.append(spool)
        return spool

    yield open_
    for spool in reversed(opened):
        await spool.close()


async def test_concurrent_claims_of_two_replicas_never_share_a_job_nor_run_a_user_twice(
    replicas,
):
    a, b = await replicas(clock=time.time), await replicas(clock=time.time)
    users = [f"user{i}" for i in range(4)]
    enqueued: dict[str, list[str]] = collections.defaultdict(list)
    for i in range(48):
        user = users[i % len(users)]
        enqueued[user].append(await (a if i % 2 else b).enqueue(exchange(user, str(i))))
    claimed: dict[str, list[str]] = collections.defaultdict(list)
    running: collections.Counter[str] = collections.Counter()
    overlaps: list[str] = []
    remaining = 48

    async def claimer(spool: PostgresSpool) -> None:
        nonlocal remaining
        while remaining:
            claim = await spool.claim()
            if claim.job is None:
                await asyncio.sleep(0.001)
                continue
            job = claim.job
            running[job.user_id] += 1
            if running[job.user_id] > 1:
                overlaps.append(job.user_id)
            claimed[job.user_id].append(job.id)
            await asyncio.sleep(0.002)  # the job's work, while others claim
            # Leaves the count before completing: a claim of the user's next
            # job can only come after the completion commits.
            running[job.user_id] -= 1
            remaining -= 1
            assert await spool.complete(job)

    await asyncio.wait_for(
        asyncio.gather(*(claimer(spool) for spool in (a, b) for _ in range(4))), timeout=60
    )
    assert overlaps == []
    # Each job exactly once, each user's in the order they were enqueued.
    assert dict(claimed) == dict(enqueued)
    stats = await a.stats()
    assert (stats.done, stats.pending, stats.running) == (48, 0, 0)


async def test_racing_claimers_on_one_user_get_one_job_between_them(replicas):
    spools = [await replicas() for _ in range(2)]
    for i in range(3):
        await spools[0].enqueue(exchange("alice", str(i)))
    for _ in range(10):
        claims = await asyncio.gather(*(s.claim() for s in spools for _ in range(4)))
        jobs = [c.job for c in claims if c.job is not None]
        assert len(jobs) == 1
        assert await spools[0].release(jobs[0])


async def test_a_job_leased_by_a_dead_replica_is_claimed_again_after_its_lease(replicas, clock):
    dead, alive = await replicas(), await replicas()
    job_id = await alive.enqueue(exchange("alice"))
    lost = (await dead.claim()).job
    assert await dead.save_decision(lost, [Operation(op="ADD", text="Likes tea")])
    await dead.close()  # the replica's machine goes away, its job still leased
    clock.now += 29
    claim = await alive.claim()
    assert claim.job is None
    assert claim.wait == pytest.approx(1)
    clock.now += 2
    resumed = (await alive.claim()).job
    assert (resumed.id, resumed.attempts) == (job_id, 2)
    # Applied from the saved decision: no second model call.
    assert resumed.decision == [Operation(op="ADD", text="Likes tea")]
    # Should the old claim come back, it can touch nothing.
    zombie = await replicas()
    assert not await zombie.owns(lost)
    assert not await zombie.complete(lost)
    assert not await zombie.heartbeat(lost)
    assert await alive.complete(resumed)


async def test_an_erase_on_one_replica_is_seen_by_a_worker_on_another(replicas):
    worker, api = await replicas(), await replicas()
    await api.enqueue(exchange("alice", "one"))
    await api.enqueue(exchange("alice", "two"))
    job = (await worker.claim()).job
    assert await worker.owns(job)
    assert await api.delete_user("alice") == 2
    assert not await worker.owns(job)
    assert not await worker.save_decision(job, [Operation(op="ADD", text="x")])
    assert not await worker.complete(job)
    assert await worker.get(job.id) is None


async def test_a_job_committed_after_a_later_one_was_claimed_waits_for_it(
    replicas, postgres_url, clock
):
    """`seq` is drawn before commit: an enqueue that commits late shows up as
    the user's oldest job while a younger one already runs."""
    spool = await replicas()
    payload = msgspec.json.encode(exchange("alice", "slow"))
    async with await psycopg.AsyncConnection.connect(postgres_url) as slow:
        await slow.execute(
            "INSERT INTO extraction_jobs (id, user_id, payload, state, next_attempt_at,"
            " created_at, updated_at) VALUES ('slow', 'alice', %s, 'pending', %s, %s, %s)",
            (payload, clock.now, clock.now, clock.now),
        )
        fast = await spool.enqueue(exchange("alice", "fast"))
        running = (await spool.claim()).job
        assert running.id == fast
        await slow.commit()
    claim = await spool.claim()
    assert claim.job is None
    assert claim.wait == pytest.approx(30)
    assert await spool.complete(running)
    assert (await spool.claim()).job.id == "slow"


async def test_no_acknowledged_job_is_lost_when_the_server_crashes_and_the_queue_reconnects(
    replicas, postgres_server: PostgresServer
):
    spool = await replicas()
    ids = [await spool.enqueue(exchange(f"user{i % 3}", str(i))) for i in range(20)]
    job = (await spool.claim()).job
    postgres_server.restart("immediate")  # a crash: recovery from the WAL
    # The same pool, its connections dead: replaced before use.
    assert sorted(j.id for j in await spool.jobs()) == sorted(ids)
    assert await spool.owns(job)
    assert await spool.complete(job)
    later = await spool.enqueue(exchange("user9"))
    assert (await spool.get(later)).state == "pending"
    assert (await spool.stats()).pending == 20


async def test_the_maintenance_lock_has_one_holder_among_replicas(replicas):
    a, b = await replicas(), await replicas()
    lock_a, lock_b = a.maintenance_lock(), b.maintenance_lock()
    assert await lock_a.acquire(blocking=False)
    assert await lock_a.acquire(blocking=False)  # kept
    assert not await lock_b.acquire(blocking=False)
    # A blocking acquire waits for the holder to let go.
    waiting = asyncio.create_task(lock_b.acquire())
    await asyncio.sleep(0.2)
    assert not waiting.done()
    lock_a.release()
    assert await asyncio.wait_for(waiting, 10)
    assert not await lock_a.acquire(blocking=False)


async def test_the_maintenance_lock_is_freed_when_its_holder_closes_or_its_connection_dies(
    replicas, postgres_url
):
    a, b, c = await replicas(), await replicas(), await replicas()
    lock_a, lock_b, lock_c = a.maintenance_lock(), b.maintenance_lock(), c.maintenance_lock()
    assert await lock_a.acquire(blocking=False)
    await a.close()
    assert await lock_b.acquire(blocking=False)
    # The holder's connection dies (a network cut, the server killed it).
    assert lock_b._conn is not None
    pid = lock_b._conn.info.backend_pid
    async with await psycopg.AsyncConnection.connect(postgres_url, autocommit=True) as admin:
        # With a timeout it returns once the backend is gone, its locks with it.
        cur = await admin.execute("SELECT pg_terminate_backend(%s, 10000)", (pid,))
        assert (await cur.fetchone())[0]
    assert await lock_c.acquire(blocking=False)
    # The old holder finds out at its next turn, and does not hold it.
    assert not await lock_b.acquire(blocking=False)
    assert not lock_b.held


async def test_server_defaults_that_would_break_the_guarantees_are_overruled(
    postgres_url, replicas
):
    async with await psycopg.AsyncConnection.connect(postgres_url, autocommit=True) as admin:
        database = postgres_url.rsplit("/", 1)[1]
        # Acknowledging before the WAL is flushed; claims whose re-check after
        # taking the user's lock would read an old snapshot.
        await admin.execute(f"ALTER DATABASE {database} SET synchronous_commit = off")
        await admin.execute(
            f"ALTER DATABASE {database} SET default_transaction_isolation = 'repeatable read'"
        )
    spool = await replicas()
    async with spool._pool.connection() as conn:
        cur = await conn.execute("SHOW synchronous_commit")
        assert (await cur.fetchone())[0] == "on"
        async with conn.transaction():
            cur = await conn.execute("SHOW transaction_isolation")
            assert (await cur.fetchone())[0] == "read committed"


def test_a_url_is_logged_without_its_password():
    assert masked_url("postgresql://gw:s3cr:et@db.internal:5432/memory") == (
        "postgresql://gw:***@db.internal:5432/memory"
    )
    assert masked_url("postgres://gw@db/memory") == "postgres://gw@db/memory"
    assert masked_url("postgresql://db/memory?user=gw&password=s3cret&sslmode=require") == (
        "postgresql://db/memory?user=gw&password=***&sslmode=require"
    )
    # An @ in the password: everything up to the last @ is masked.
    assert "p@ss" not in masked_url("postgresql://gw:p@ss@db/memory")


async def test_the_password_never_reaches_the_logs(postgres_url, caplog, monkeypatch):
    caplog.set_level(logging.DEBUG)
    spool = await PostgresSpool.open(postgres_url, lease_seconds=30)
    lock = spool.maintenance_lock()
    assert await lock.acquire(blocking=False)
    await spool.close()
    assert "memgw:***@127.0.0.1" in caplog.text
    # A wrong password: the start fails, naming the server, not the secret.
    monkeypatch.setattr(spool_postgres, "POOL_TIMEOUT_SECONDS", 1.0)
    wrong = postgres_url.replace(PASSWORD, "wrong-pw-7c1e")
    with pytest.raises(ConnectionError) as failed:
        await PostgresSpool.open(wrong, lease_seconds=30)
    assert "memgw:***@127.0.0.1" in str(failed.value)
    assert "wrong-pw-7c1e" not in str(failed.value)
    # A URL libpq cannot parse: its error quotes the whole URL.
    with pytest.raises(ValueError, match="not a valid PostgreSQL URL") as malformed:
        await PostgresSpool.open("postgresql://memgw:wrong-pw-7c1e@[::1/db", lease_seconds=30)
    assert "wrong-pw-7c1e" not in str(malformed.value)
    broken = AdvisoryLock(Target(wrong), "%s", (1,))
    assert not await broken.acquire(blocking=False)
    await broken.aclose()
    for secret in (PASSWORD, "wrong-pw-7c1e"):
        assert secret not in caplog.text


async def test_the_engine_runs_on_a_postgres_queue_with_a_shared_maintenance_lock(
    postgres_url, tmp_path
):
    engines = [
        await MemoryEngine.open(
            MemoryConfig(),
            tmp_path / name,
            queue=QueueConfig(url=postgres_url),
            default_base_url="http://llm.test/v1",
            embedder=HashEmbedder(),
        )
        for name in ("one", "two")
    ]
    try:
        one, two = engines
        assert isinstance(one.spool, PostgresSpool)
        job_id = await one.record_exchange(exchange("alice", "I live in Berlin"))
        # The other replica (its own data directory) sees the job.
        assert (await two.spool.get(job_id)).user_id == "alice"
        locks = [e.maintenance._lock for e in engines]
        assert all(isinstance(lock, AdvisoryLock) for lock in locks)
        assert await locks[0].acquire(blocking=False)
        assert not await locks[1].acquire(blocking=False)
    finally:
        for engine in engines:
            await engine.close()
    assert not (tmp_path / "one" / "spool.sqlite3").exists()
