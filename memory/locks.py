"""File locks between the processes that share one data directory.

`flock` locks belong to an open file: they are released when the holder closes
it or dies, so a killed process never leaves a stale lock behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
from collections.abc import AsyncIterator
from pathlib import Path


class FileLock:
    """A lock on `path`, held until `release()` (or process exit): exclusive,
    or `shared` with other shared holders."""

    def __init__(self, path: Path, *, shared: bool = False) -> None:
        self.path = Path(path)
        self._mode = fcntl.LOCK_SH if shared else fcntl.LOCK_EX
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def _acquire(self, blocking: bool) -> bool:
        if self._fd is not None:
            return True
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, self._mode if blocking else self._mode | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        return True

    async def acquire(self, *, blocking: bool = True) -> bool:
        """Take the lock (waiting in a thread, off the event loop); `False` when
        `blocking=False` and another holder has it."""
        return await asyncio.to_thread(self._acquire, blocking)

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)


@contextlib.asynccontextmanager
async def locked(path: Path, *, shared: bool = False) -> AsyncIterator[None]:
    lock = FileLock(path, shared=shared)
    await lock.acquire()
    try:
        yield
    finally:
        lock.release()
