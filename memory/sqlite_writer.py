"""One SQLite connection on one dedicated thread, with group commit.

Every call on the connection runs on the writer's one thread: the event loop
never waits on disk. Writes that arrive while a commit is in progress are
grouped into the next transaction (`grouped`), each in its own savepoint: one
fsync covers them all, a failing one is rolled back alone, and none returns
before its commit (concurrent writers do not queue behind each other's
fsyncs). `transaction` runs one write in a transaction of its own.

Writes take SQLite's single writer lock up front (`BEGIN IMMEDIATE`), so each
is atomic across threads and processes sharing the file. The writer knows
nothing of what the rows mean (memory/spool.py gives them their meaning).
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")

# The first and the longest pause between two tries of `BEGIN IMMEDIATE`.
_BEGIN_FIRST_PAUSE = 50e-6
_BEGIN_MAX_PAUSE = 2e-3


def begin_immediate(db: sqlite3.Connection, busy_timeout_ms: int) -> None:
    """`BEGIN IMMEDIATE`, waiting for another process's write in short steps
    (for `busy_timeout_ms` at most; then the connection's busy timeout is
    `busy_timeout_ms` again).

    SQLite's own busy handler sleeps 1 ms at the first conflict, then 2, 5,
    10 ms...; a writer in another process (the extraction process, another
    worker) holds the lock for a fraction of a millisecond, so most waits
    lasted several times longer than the lock: an enqueue's p99 went from
    1.2 to 5 ms with a second process claiming and completing jobs. Here the
    pause starts at 50 us and doubles up to 2 ms.
    """
    db.execute("PRAGMA busy_timeout=0")
    try:
        pause = _BEGIN_FIRST_PAUSE
        deadline = time.monotonic() + busy_timeout_ms / 1000
        while True:
            try:
                db.execute("BEGIN IMMEDIATE")
                return
            except sqlite3.OperationalError as exc:
                if exc.sqlite_errorcode != sqlite3.SQLITE_BUSY or time.monotonic() >= deadline:
                    raise
            time.sleep(pause)
            pause = min(2 * pause, _BEGIN_MAX_PAUSE)
    finally:
        db.execute(f"PRAGMA busy_timeout={busy_timeout_ms}")


class GroupCommitWriter:
    """Runs calls on one SQLite connection on its own thread; groups writes.

    `open` with a function that connects (run on the thread); `close` at the end.
    """

    def __init__(self, *, thread_name: str, busy_timeout_ms: int) -> None:
        # How long a write waits for another process's lock before failing.
        self.busy_timeout_ms = busy_timeout_ms
        self._name = thread_name
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=thread_name)
        self._db: sqlite3.Connection | None = None
        # Writes waiting for the next group commit, and the task committing them.
        self._pending: list[tuple[Callable[[sqlite3.Connection], Any], asyncio.Future[Any]]] = []
        self._flusher: asyncio.Task[None] | None = None

    async def open(self, connect: Callable[[], sqlite3.Connection]) -> None:
        """Connect on the writer's thread; on failure the thread is let go."""
        try:
            self._db = await self.run(connect)
        except BaseException:
            self._executor.shutdown(wait=False)
            raise

    async def close(self) -> None:
        """Wait for the writes in flight, close the connection, end the thread."""
        if self._flusher is not None:
            await asyncio.gather(self._flusher, return_exceptions=True)
        if self._db is not None:
            await self.run(self._db.close)
            self._db = None
        self._executor.shutdown(wait=True)

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """Call `fn(*args)` on the writer's thread."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, fn, *args)

    def conn(self) -> sqlite3.Connection:
        """The connection (for calls made through `run`)."""
        if self._db is None:
            raise RuntimeError(f"the {self._name} is closed")
        return self._db

    def write(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run `fn` in one immediate (write-locked) transaction, on the
        writer's thread (through `run`)."""
        db = self.conn()
        begin_immediate(db, self.busy_timeout_ms)
        try:
            result = fn(db)
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")
        return result

    async def transaction(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run `fn` in a transaction of its own."""
        return await self.run(self.write, fn)

    async def grouped(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run `fn` in the next group commit; returns once that commit is done."""
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._pending.append((fn, future))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush())
        return await future

    async def _flush(self) -> None:
        while self._pending:
            batch = [(fn, fut) for fn, fut in self._pending if not fut.done()]
            self._pending = []
            if not batch:
                continue
            try:
                outcomes = await self.run(self._write_group, [fn for fn, _ in batch])
            except Exception as exc:
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(exc)
                continue
            for (_, fut), (ok, value) in zip(batch, outcomes, strict=True):
                if fut.done():
                    continue
                if ok:
                    fut.set_result(value)
                else:
                    fut.set_exception(value)

    def _write_group(
        self, fns: list[Callable[[sqlite3.Connection], Any]]
    ) -> list[tuple[bool, Any]]:
        """One transaction; a failing `fn` is rolled back to its savepoint alone."""
        db = self.conn()
        begin_immediate(db, self.busy_timeout_ms)
        outcomes: list[tuple[bool, Any]] = []
        try:
            for fn in fns:
                db.execute("SAVEPOINT one")
                try:
                    outcomes.append((True, fn(db)))
                except Exception as exc:
                    db.execute("ROLLBACK TO one")
                    outcomes.append((False, exc))
                db.execute("RELEASE one")
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        return outcomes
