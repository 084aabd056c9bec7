"""Background workers draining the spool: bounded concurrency, one user at a time.

The spool decides what may run (per-user order, leases); the pool runs up to
`spool.concurrency` jobs, renews their leases, turns failures into retries with
capped exponential backoff, and parks a job as failed after `max_attempts`.
Enqueues in this process wake an idle worker at once (one: a worker that got
a job wakes the next, so a burst fans out and a lone job does not make every
worker query the spool). A slow poll covers jobs written by other processes:
one timer wakes one idle worker every `poll_interval`, rather than every idle
worker's own timeout, which expired together and made all of them query the
spool at once (a burst of 15-40 ms latencies every 2 s at c=1). A worker that
was told when a job comes due (a backoff) waits for that on its own.

The poll's timer (`poll_wait`), the clock and interval of the purge of done
jobs are constructor arguments, so tests drive them tick by tick instead of
sleeping through real intervals.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import random
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from typing import Any

from memory.config import SpoolConfig
from memory.errors import StorageUnavailable
from memory.extraction import FOR_GOOD_CATEGORIES, ExtractionError, ExtractionUnavailable
from memory.redaction import redact
from memory.spool import Job
from memory.spools import JobQueue

log = logging.getLogger("memory.workers")

Handler = Callable[[Job], Coroutine[Any, Any, None]]
MAX_ERROR_CHARS = 2000
# How often a worker purges done jobs older than `keep_done_seconds`.
PURGE_EVERY = 60.0


class Deferred(Exception):
    """Raised by a handler to hand the job back untouched; `reason` says why
    it waits (`no_key`: no key may be sent to the extraction endpoint for
    its user yet)."""

    def __init__(self, job_id: str, reason: str = "no_key") -> None:
        super().__init__(job_id)
        self.reason = reason


class LeaseLost(Exception):
    """Another worker took the job (our lease expired) or the job was deleted."""


def backoff(config: SpoolConfig, attempts: int) -> float:
    """Capped exponential delay before attempt `attempts + 1`, with a little jitter."""
    delay = min(config.backoff_max, config.backoff_initial * 2 ** max(attempts - 1, 0))
    return delay * random.uniform(0.8, 1.0)


class WorkerPool:
    def __init__(
        self,
        spool: JobQueue,
        handler: Handler,
        config: SpoolConfig,
        *,
        users: Callable[[], Iterable[str] | None] = lambda: None,
        erased: Handler | None = None,
        poll_wait: Callable[[float], Awaitable[object]] = asyncio.sleep,
        clock: Callable[[], float] = time.monotonic,
        purge_every: float = PURGE_EVERY,
    ) -> None:
        """`poll_wait(poll_interval)` is awaited between two polls; `clock`
        (seconds) and `purge_every` pace the purge of done jobs."""
        self._spool = spool
        self._handler = handler
        # Undoes what a finished job wrote when its user was erased meanwhile.
        self._erased = erased
        self._config = config
        # Which users' jobs may be claimed now (None: everyone).
        self._users = users
        self._tasks: list[asyncio.Task[None]] = []
        self._poller: asyncio.Task[None] | None = None
        self._wakers: list[asyncio.Event] = []
        # Workers waiting for work, the longest idle first.
        self._idle: collections.deque[asyncio.Event] = collections.deque()
        # A wake-up that found no idle worker: the next worker to finish a
        # claim looks again instead of sleeping (no lost wake-up).
        self._missed = False
        self._inflight: dict[str, tuple[Job, asyncio.Task[None]]] = {}
        self._changed = asyncio.Event()
        self._stopping = False
        self._clock = clock
        self._purge_every = purge_every
        self._last_purge = 0.0
        self._poll_wait = poll_wait
        # Consecutive "model unavailable" outcomes, for the outage backoff.
        self._outage_streak = 0

    @property
    def running(self) -> bool:
        return bool(self._tasks) and not self._stopping

    def start(self) -> None:
        if self._tasks:
            return
        self._stopping = False
        for n in range(max(1, self._config.concurrency)):
            waker = asyncio.Event()
            self._wakers.append(waker)
            self._tasks.append(asyncio.create_task(self._work(waker), name=f"spool-worker-{n}"))
        self._poller = asyncio.create_task(self._poll(), name="spool-poll")

    async def _poll(self) -> None:
        while not self._stopping:
            await self._poll_wait(self._config.poll_interval)
            self.notify()

    def notify(self) -> None:
        """Something may have become claimable: wake one idle worker."""
        while self._idle:
            waker = self._idle.popleft()
            if not waker.is_set():
                waker.set()
                return
        self._missed = True

    def _notify_all(self) -> None:
        for waker in self._wakers:
            waker.set()

    async def changed(self, timeout: float) -> None:  # noqa: ASYNC109 - returns on timeout
        """Wait until a job finishes or fails in this process, or `timeout` passes."""
        event = self._changed
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(event.wait(), timeout)

    def _signal_change(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def stop(self) -> None:
        """Stop claiming; interrupt running jobs and give their leases back."""
        self._stopping = True
        if self._poller is not None:
            self._poller.cancel()
            self._poller = None
        self._notify_all()
        for _, task in list(self._inflight.values()):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        self._wakers.clear()
        self._idle.clear()

    async def cancel_user(self, user_id: str) -> None:
        """Stop this process's running jobs of a user (their rows are being erased)."""
        tasks = [task for job, task in self._inflight.values() if job.user_id == user_id]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _work(self, waker: asyncio.Event) -> None:
        while not self._stopping:
            waker.clear()
            try:
                await self._maybe_purge()
                claim = await self._spool.claim(users=self._users())
            except Exception:
                log.exception("claiming a spool job failed")
                claim = None
            if claim is not None and claim.job is not None:
                self.notify()  # there may be more: let the next idle worker look
                try:
                    await self._run(claim.job)
                except Exception:
                    log.exception("spool worker error on job %s", claim.job.id)
                continue
            if self._missed:
                self._missed = False
                continue
            # Woken by an enqueue, a finished job or the poll; or when a
            # backed-off job it was told of comes due.
            due = None if claim is None or claim.wait is None else claim.wait + 0.01
            self._idle.append(waker)
            try:
                if due is None:
                    await waker.wait()
                else:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(waker.wait(), min(due, self._config.poll_interval))
            finally:
                with contextlib.suppress(ValueError):
                    self._idle.remove(waker)

    async def _maybe_purge(self) -> None:
        now = self._clock()
        if now - self._last_purge < self._purge_every:
            return
        self._last_purge = now
        await self._spool.purge(self._config.keep_done_seconds)

    async def _run(self, job: Job) -> None:
        task = asyncio.create_task(self._handler(job), name=f"spool-job-{job.id}")
        self._inflight[job.id] = (job, task)
        heartbeat = asyncio.create_task(self._heartbeat(job, task))
        try:
            try:
                await asyncio.shield(task)
            except Exception:  # noqa: S110 - the outcome is read from the task in _settle
                pass
            except asyncio.CancelledError:
                if not task.done():
                    # The worker itself is cancelled: stop the job, give it back, go.
                    task.cancel()
                    with contextlib.suppress(BaseException):
                        await task
                    await self._settle(job, task)
                    raise
            await self._settle(job, task)
        finally:
            heartbeat.cancel()
            self._inflight.pop(job.id, None)
            self._signal_change()

    async def _settle(self, job: Job, task: asyncio.Task[None]) -> None:
        """Record how the job ended."""
        try:
            if task.cancelled():
                # Shutdown, a lost lease or an erased user: give the job back if still ours.
                await self._spool.release(job)
                return
            exc = task.exception()
            if exc is None:
                self._outage_streak = 0
                completed = await self._spool.complete(job)
                erased = not completed and await self._spool.get(job.id) is None
                if erased and self._erased is not None:
                    # Its user was erased after the job's last ownership check,
                    # perhaps by another process, whose erase may have run
                    # before the job's write landed: undo it. (An erase after
                    # this completion finds the rows and removes them itself.)
                    await self._erased(job)
                self.notify()  # the user's next job is claimable now
                return
            if isinstance(exc, Deferred):
                await self._spool.release(job, reason=exc.reason)
                return
            if isinstance(exc, LeaseLost):
                return
            error = redact(str(exc) or type(exc).__name__)[:MAX_ERROR_CHARS]
            if isinstance(exc, ExtractionUnavailable | StorageUnavailable):
                # An outage: back off (up to backoff_max) and try again, however
                # long it lasts; the streak is shared since the model (or the
                # object store) is down for all.
                self._outage_streak += 1
                delay = backoff(self._config, self._outage_streak)
                what, reason = (
                    ("the object store", "storage_unavailable")
                    if isinstance(exc, StorageUnavailable)
                    else ("the extraction model", "model_unavailable")
                )
                log.warning("spool job %s waits for %s: %s", job.id, what, error)
                await self._spool.fail(job, error, retry_in=delay, counted=False, reason=reason)
                return
            category = exc.category if isinstance(exc, ExtractionError) else "error"
            if job.attempts >= self._config.max_attempts or category in FOR_GOOD_CATEGORIES:
                # Retrying cannot fix a prompt too long, a missing model or a
                # refused key: the reason tells the operator what to change.
                log.warning("spool job %s failed for good (%s): %s", job.id, category, error)
                await self._spool.fail(job, error, retry_in=None, reason=category)
                self.notify()
            else:
                delay = backoff(self._config, job.attempts)
                log.info("spool job %s failed (retry in %.1fs): %s", job.id, delay, error)
                await self._spool.fail(job, error, retry_in=delay, reason=category)
        except Exception:
            log.exception("recording the outcome of spool job %s failed", job.id)

    async def _heartbeat(self, job: Job, task: asyncio.Task[None]) -> None:
        interval = max(self._config.lease_seconds / 3, 0.05)
        while not task.done():
            await asyncio.sleep(interval)
            try:
                alive = await self._spool.heartbeat(job)
            except Exception:
                log.exception("renewing the lease of spool job %s failed", job.id)
                continue
            if not alive:
                log.warning("spool job %s: lease lost, abandoning it", job.id)
                task.cancel()
                return
