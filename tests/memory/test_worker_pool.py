"""The spool's worker pool: who looks for work, and when.

The poll's timer is a `Ticks` the test advances by hand, so each poll is an
event the test causes and waits on, rather than real intervals slept through."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from memory.config import SpoolConfig
from memory.spool import Spool
from memory.workers import WorkerPool
from tests.memory.helpers import exchange

POLL = 0.01  # what the pool asks its poll timer for; workers never wait on it


class Ticks:
    """Stands in for the poll's sleep: records the interval asked for and
    returns when the test calls `tick()`."""

    def __init__(self) -> None:
        self.asked: list[float] = []
        self._ticks = asyncio.Semaphore(0)

    async def __call__(self, seconds: float) -> None:
        self.asked.append(seconds)
        await self._ticks.acquire()

    def tick(self) -> None:
        self._ticks.release()


async def until(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.001)


def counting_claims(spool: Spool) -> list[int]:
    """Count `spool.claim` calls; the count is the list's one item."""
    claims = [0]
    claim = spool.claim

    async def counted(**kwargs):
        claims[0] += 1
        return await claim(**kwargs)

    spool.claim = counted  # type: ignore[method-assign]
    return claims


async def test_an_idle_pool_polls_once_per_interval_and_finds_other_processes_jobs(tmp_path):
    """Idle workers do not each poll on their own timer: those expired
    together and sent every worker to the spool at once, a latency burst for
    the requests being served. One poll wakes one worker; a job it finds
    wakes the next."""
    spool = await Spool.open(tmp_path / "spool.sqlite3")
    claims = counting_claims(spool)
    done: list[str] = []
    all_running = asyncio.Event()

    async def handler(job) -> None:
        done.append(job.exchange.scope.user_id)
        if len(done) == 3:
            all_running.set()
        await all_running.wait()  # the three run side by side, or none finishes

    ticks = Ticks()
    pool = WorkerPool(
        spool, handler, SpoolConfig(concurrency=8, poll_interval=POLL), poll_wait=ticks
    )
    pool.start()
    try:
        await until(lambda: claims[0] >= 8 and len(ticks.asked) == 1)
        assert claims[0] == 8  # each worker looked once on start

        def polled(polls: int) -> Callable[[], bool]:
            """The poller is back in its timer and the woken worker has claimed."""
            return lambda: len(ticks.asked) == polls + 1 and claims[0] >= 8 + polls

        for polls in range(1, 6):
            ticks.tick()
            await until(polled(polls))
            assert claims[0] == 8 + polls  # one claim per poll; a timer per worker made 8
        assert ticks.asked == [POLL] * 6
        # Jobs written by another process come with no wake-up here: they wait for the poll.
        other = await Spool.open(tmp_path / "spool.sqlite3")
        for user in ("alice", "bob", "carol"):
            await other.enqueue(exchange(user))
        await other.close()
        # Idle workers stay idle meanwhile, however many poll intervals pass
        # (a slow machine only makes this check weaker, never wrong).
        await asyncio.sleep(5 * POLL)
        assert (claims[0], done) == (13, [])
        ticks.tick()  # one poll finds all three: each worker that got a job wakes the next
        await until(all_running.is_set)
        assert sorted(done) == ["alice", "bob", "carol"]
    finally:
        await pool.stop()
        await spool.close()


class Clock:
    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


async def test_done_jobs_are_purged_once_per_purge_interval(tmp_path):
    spool = await Spool.open(tmp_path / "spool.sqlite3")
    claims = counting_claims(spool)
    purged: list[float] = []
    purge = spool.purge

    async def recorded(older_than: float) -> int:
        purged.append(older_than)
        return await purge(older_than)

    spool.purge = recorded  # type: ignore[method-assign]

    async def handler(job) -> None:
        pass

    ticks, clock = Ticks(), Clock()
    config = SpoolConfig(concurrency=1, keep_done_seconds=5.0)
    pool = WorkerPool(spool, handler, config, poll_wait=ticks, clock=clock, purge_every=60.0)
    pool.start()
    try:
        await until(lambda: claims[0] == 1)
        assert purged == [5.0]  # the first claim purges
        clock.now += 59.0
        ticks.tick()
        await until(lambda: claims[0] == 2)
        assert purged == [5.0]  # not before the interval is over
        clock.now += 1.0
        ticks.tick()
        await until(lambda: claims[0] == 3)
        assert purged == [5.0, 5.0]
    finally:
        await pool.stop()
        await spool.close()
