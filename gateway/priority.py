"""CPU priority of the extraction process: requests first, memory after.

Extraction is background work, so the extraction process runs at Linux's
SCHED_IDLE: it gets a core only when no serving process wants it, and a
request never waits behind an extraction job for the CPU. With a real model
the cores are idle most of the time and extraction keeps up at once; under
sustained full load its jobs wait in the spool (durable) instead. So that
memory never falls behind without bound, `PriorityGuard` switches the
process to normal priority while its oldest due job has waited longer than
`server.extraction_max_lag_seconds`, and back once it has caught up.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path

from memory.spool import THREAD_NAME as SPOOL_THREAD

logger = logging.getLogger("gateway.extraction")

_TASKS = Path("/proc/self/task")


def background_supported() -> bool:
    return hasattr(os, "SCHED_IDLE") and _TASKS.is_dir()


def set_background(background: bool) -> None:
    """Every thread of this process at idle (True) or normal (False) priority,
    except the spool's, which always keeps normal priority.

    The spool's SQLite write lock is the one thing the extraction process
    shares with requests: every exchange's enqueue takes it. A transaction
    preempted midway at idle priority held it for milliseconds, and requests
    waited (enqueue p99 3.8-5.9 ms, docs/benchmarks.md); at normal priority
    the spool's thread is not preempted by requests, and its few short
    transactions take next to no CPU from them.

    A policy is per thread and a new thread inherits its creator's, so each
    call also catches threads started since the last one. Raises OSError
    where the system refuses (a seccomp profile, say)."""
    names = {t.native_id: t.name for t in threading.enumerate()}
    for entry in os.listdir(_TASKS):
        tid = int(entry)
        spool = names.get(tid, "").startswith(SPOOL_THREAD)
        policy = os.SCHED_IDLE if background and not spool else os.SCHED_OTHER
        try:
            if os.sched_getscheduler(tid) != policy:
                os.sched_setscheduler(tid, policy, os.sched_param(0))
        except ProcessLookupError:
            continue  # the thread has exited meanwhile


class PriorityGuard:
    """Background priority while the spool keeps up, normal while it lags.

    Normal priority from a lag over `max_lag` until it is under half of it,
    so that a backlog near the limit does not flip the priority every check.
    """

    def __init__(
        self,
        lag: Callable[[], Awaitable[float]],
        max_lag: float,
        *,
        interval: float = 1.0,
        apply: Callable[[bool], None] = set_background,
    ) -> None:
        self._lag = lag
        self._max_lag = max_lag
        self._interval = interval
        self._apply = apply
        self.background = True

    async def run(self) -> None:
        try:
            self._apply(True)
            while True:
                await asyncio.sleep(self._interval)
                try:
                    lag = await self._lag()
                except Exception:
                    logger.exception("cannot read the spool's lag; the CPU priority stays")
                    continue
                if self.background and lag > self._max_lag:
                    self.background = False
                    logger.warning(
                        "extraction is %.0f s behind (full CPU load?): it runs at normal"
                        " CPU priority until it has caught up",
                        lag,
                    )
                elif not self.background and lag < self._max_lag / 2:
                    self.background = True
                    logger.info("extraction has caught up: back to background CPU priority")
                self._apply(self.background)
        except OSError as exc:
            logger.warning("cannot change the extraction process's CPU priority: %s", exc)
        except asyncio.CancelledError:
            # Shutting down (handing running jobs back) must not wait for a free core.
            with contextlib.suppress(OSError):
                self._apply(False)
            raise
