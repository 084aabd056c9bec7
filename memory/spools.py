"""Which extraction queue the engine uses, and what the rest of the code may
ask of one.

`queue.url: sqlite` (the default) keeps the queue in one SQLite file in the
data directory (memory/spool.py): every process of one machine shares it.
A `postgresql://` URL puts it in PostgreSQL (memory/spool_postgres.py), so
that replicas on several machines share one queue. Both keep the same
guarantees; the rest of the code sees them through `JobQueue`.

psycopg is an optional extra (`memory-gateway[postgres]`): it is imported
only when a PostgreSQL URL is configured.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Iterable, Sequence
from pathlib import Path
from typing import Protocol

from memory.config import QueueConfig
from memory.locks import FileLock
from memory.models import Exchange, Operation, SpoolStats
from memory.spool import Claim, Job, JobInfo, JobState, Outcomes, Spool

log = logging.getLogger("memory.spools")

SPOOL_FILE = "spool.sqlite3"
POSTGRES_SCHEMES = ("postgresql://", "postgres://")


class JobQueue(Protocol):
    """The extraction queue as the engine, its workers and its monitor use it.

    Implementations: `Spool` (SQLite) and `PostgresSpool`. The guarantees
    (durable enqueue, one user strictly serial, leases, the decision stored
    before it is applied, erasure seen by every claimer) are in memory/spool.py.
    """

    async def enqueue(self, exchange: Exchange, *, reason: str | None = None) -> str: ...

    async def claim(self, *, users: Iterable[str] | None = None) -> Claim: ...

    async def heartbeat(self, job: Job) -> bool: ...

    async def owns(self, job: Job) -> bool: ...

    async def save_decision(self, job: Job, ops: Sequence[Operation]) -> bool: ...

    async def complete(self, job: Job) -> bool: ...

    async def fail(
        self,
        job: Job,
        error: str,
        *,
        retry_in: float | None,
        counted: bool = True,
        reason: str = "error",
    ) -> bool: ...

    async def release(self, job: Job, *, reason: str | None = None) -> bool: ...

    async def get(self, job_id: str) -> JobInfo | None: ...

    async def decision(self, job_id: str) -> list[Operation] | None: ...

    async def jobs(
        self, *, state: JobState | None = None, user_id: str | None = None, limit: int = 100
    ) -> list[JobInfo]: ...

    async def retry_failed(self, user_id: str | None = None) -> int: ...

    async def delete_user(self, user_id: str, agent_id: str | None = None) -> int: ...

    async def purge(self, older_than: float) -> int: ...

    async def stats(self) -> SpoolStats: ...

    async def reasons(self) -> dict[str, dict[str, int]]: ...

    async def outcomes(self, window: float) -> Outcomes: ...

    async def mark_waiting(self, reason: str, *, except_users: Iterable[str] = ()) -> int: ...

    async def lag(self, *, users: Iterable[str] | None = None) -> float: ...

    async def unfinished(self) -> int: ...

    async def close(self) -> None: ...


class ExclusiveLock(Protocol):
    """A lock one process holds among all that share the data (the
    maintenance lease): `memory.locks.FileLock` on one machine, a PostgreSQL
    advisory lock across machines."""

    async def acquire(self, *, blocking: bool = True) -> bool: ...

    def release(self) -> None: ...


def is_postgres(url: str) -> bool:
    return url.startswith(POSTGRES_SCHEMES)


async def open_spool(queue: QueueConfig, data_dir: Path, *, lease_seconds: float) -> JobQueue:
    """Open the queue `queue.url` names: the SQLite file in `data_dir`, or PostgreSQL."""
    if not is_postgres(queue.url):
        return await Spool.open(data_dir / SPOOL_FILE, lease_seconds=lease_seconds)
    try:
        from memory.spool_postgres import PostgresSpool
    except ImportError as exc:
        raise RuntimeError(
            "queue.url is a PostgreSQL URL but psycopg is not installed:"
            " pip install 'memory-gateway[postgres]'"
        ) from exc
    return await PostgresSpool.open(queue.url, lease_seconds=lease_seconds)


@contextlib.asynccontextmanager
async def opening(queue: QueueConfig) -> AsyncIterator[None]:
    """Replicas that share a PostgreSQL queue open their stores one at a
    time (memory/spool_postgres.py, `opening_lock`); with SQLite, the data
    directory's own lock does that for one machine's processes."""
    if not is_postgres(queue.url):
        yield
        return
    from memory.spool_postgres import Target, opening_lock

    lock = opening_lock(queue.url)
    try:
        if not await lock.acquire(blocking=True):
            raise ConnectionError(
                f"cannot reach the extraction queue at {Target(queue.url).masked}"
            )
        yield
    finally:
        await lock.aclose()


def maintenance_lock(spool: JobQueue, path: Path) -> ExclusiveLock:
    """The lock that elects the one process maintaining the store: a file
    lock at `path` beside a SQLite queue (one machine), the queue's advisory
    lock with PostgreSQL (every replica that shares the queue)."""
    if isinstance(spool, Spool):
        return FileLock(path)
    from memory.spool_postgres import PostgresSpool

    if not isinstance(spool, PostgresSpool):
        raise TypeError(f"no maintenance lock for a queue of type {type(spool).__name__}")
    return spool.maintenance_lock()
