"""Background upkeep of the store: LanceDB `optimize` on a timer and after
bursts of writes, so thousands of small writes neither slow reads nor grow
the data directory without bound."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from memory.config import MaintenanceConfig
from memory.heap import release_free_memory
from memory.spools import ExclusiveLock
from memory.store import MemoryStore

log = logging.getLogger(__name__)


class Maintenance:
    """Runs `store.optimize()` every `interval_seconds`, or sooner once
    `optimize_after_writes` writes piled up. Failures are logged and retried
    at the next turn; they never stop the loop.

    With several processes on one data directory, one of them maintains the
    store: the holder of `lock`, taken without waiting and kept; when it dies
    the lock is free and another process takes over at its next turn."""

    def __init__(
        self, store: MemoryStore, config: MaintenanceConfig, lock: ExclusiveLock | None = None
    ) -> None:
        self._store = store
        self._config = config
        self._lock = lock
        self._task: asyncio.Task[None] | None = None
        self.runs = 0
        self.failures = 0

    def start(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(
                self._loop(), name="memory-maintenance"
            )

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._lock is not None:
            self._lock.release()

    async def run_once(self) -> bool:
        """One optimize; `False` (logged) when it failed."""
        try:
            await self._store.optimize()
        except Exception:
            self.failures += 1
            log.exception("memory store maintenance failed")
            return False
        # Compaction's buffers are freed by now; give the pages back.
        await asyncio.to_thread(release_free_memory)
        self.runs += 1
        return True

    async def _loop(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    self._store.wait_for_writes(max(1, self._config.optimize_after_writes)),
                    timeout=self._config.interval_seconds,
                )
            if self._lock is not None and not await self._lock.acquire(blocking=False):
                # Another process maintains the store, our writes included.
                self._store.forget_writes()
                continue
            if not await self._store.needs_optimize():
                continue
            if not await self.run_once():
                # Back off a full interval instead of spinning on pending writes.
                await asyncio.sleep(self._config.interval_seconds)
