"""The spool's worker pool: who looks for work, and when."""

from __future__ import annotations

import asyncio

from memory.config import SpoolConfig
from memory.spool import Spool
from memory.workers import WorkerPool
from tests.memory.helpers import exchange


async def test_an_idle_pool_polls_once_per_interval_and_finds_other_processes_jobs(tmp_path):
    """Idle workers do not each poll on their own timer: those expired
    together and sent every worker to the spool at once, a latency burst for
    the requests being served. One poll wakes one worker; a job it finds
    wakes the next."""
    spool = await Spool.open(tmp_path / "spool.sqlite3")
    claims = 0
    claim = spool.claim

    async def counted(**kwargs):
        nonlocal claims
        claims += 1
        return await claim(**kwargs)

    spool.claim = counted  # type: ignore[method-assign]
    done: list[str] = []

    async def handler(job) -> None:
        done.append(job.exchange.scope.user_id)

    pool = WorkerPool(spool, handler, SpoolConfig(concurrency=8, poll_interval=0.1))
    pool.start()
    try:
        await asyncio.sleep(0.05)
        assert claims == 8  # each worker looked once on start
        await asyncio.sleep(0.6)
        assert 1 <= claims - 8 <= 12  # ~6 polls; a timer per worker made ~48 claims
        # Jobs written by another process come with no wake-up here: the poll finds them.
        other = await Spool.open(tmp_path / "spool.sqlite3")
        for user in ("alice", "bob", "carol"):
            await other.enqueue(exchange(user))
        await other.close()
        for _ in range(100):
            if len(done) == 3:
                break
            await asyncio.sleep(0.02)
        assert sorted(done) == ["alice", "bob", "carol"]
    finally:
        await pool.stop()
        await spool.close()
