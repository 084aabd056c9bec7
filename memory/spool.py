"""A durable queue of exchanges waiting for extraction, in SQLite.

`enqueue` returns only after the job is committed, so an acknowledged exchange
survives a crash. The database uses WAL with `synchronous=FULL`: in WAL mode
`NORMAL` survives a process crash but may drop the last commits on power loss,
and an acknowledged exchange must survive both; FULL costs one fsync of the WAL
per commit, which is small next to the LLM call every job makes.

Claiming is a `BEGIN IMMEDIATE` transaction (SQLite's single writer lock), so it
is atomic across threads and processes sharing the file. Only the oldest
unfinished job of a user can be claimed, and only when it is due and not held by
a live lease: one user is strictly serial, users run in parallel, and a crashed
worker's job is picked up again once its lease expires. The validated LLM
decision is stored with the job before it is applied, so a job that crashed
mid-apply is re-applied from the decision without a second LLM call; applying is
idempotent, which makes the effect exactly-once.

Every SQLite call runs on one dedicated thread (memory/sqlite_writer.py): the
event loop never waits on disk. State changes of jobs (enqueue, claim,
heartbeat, decision, outcome) go through its group commit: those that arrive
while a commit is in progress share the next one, each in its own savepoint
(concurrent workers do not queue behind each other's fsyncs), and none
returns before its commit.
API keys are never written here: jobs carry the (already redacted) exchange only.

This is the longest module of the engine on purpose: it is one table's state
machine, and every transition of a job (enqueue, claim, lease, decision,
outcome, retry, erasure) is one transaction here, where they can be read
side by side.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar

import msgspec

from memory.models import Exchange, Operation, SpoolStats
from memory.sqlite_writer import GroupCommitWriter

JobState = Literal["pending", "running", "done", "failed"]
T = TypeVar("T")

log = logging.getLogger("memory.spool")
# SQLite's verdicts on a file that is not (or no longer) a database; other errors
# (locked, no permission, disk I/O) are not the file's fault and must not move it.
_CORRUPT = frozenset({sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB})

# How long a statement waits for another process's lock before failing.
_BUSY_TIMEOUT_MS = 30_000
# The spool's one thread (its name's prefix), which runs every transaction.
THREAD_NAME = "spool"
_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    user_id TEXT NOT NULL,
    agent_id TEXT,
    session_id TEXT,
    payload BLOB NOT NULL,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL,
    lease_owner TEXT,
    lease_until REAL,
    last_error TEXT,
    reason TEXT,
    decision BLOB,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS jobs_unfinished ON jobs (user_id, seq)
    WHERE state IN ('pending', 'running');
CREATE INDEX IF NOT EXISTS jobs_state ON jobs (state, updated_at);
"""

# The head of each user's queue: the oldest job not yet done or failed. Heads
# are compared without their payloads; only the claimed one's is read.
_HEADS = """
SELECT j.seq, j.id, j.user_id, j.state, j.attempts, j.next_attempt_at, j.lease_until
FROM jobs AS j
JOIN (SELECT MIN(seq) AS seq FROM jobs WHERE state IN ('pending', 'running') GROUP BY user_id)
    AS h ON h.seq = j.seq
"""
# Users with a job under a live lease. Usually that job is their head; but a
# failed job put back (`retry_failed`) becomes the head while a later one
# runs, and must wait for it: one user never has two jobs at once.
_HELD = """
SELECT user_id, MAX(lease_until) AS until FROM jobs INDEXED BY jobs_unfinished
WHERE state IN ('pending', 'running') AND state = 'running' AND lease_until > ?
GROUP BY user_id
"""

_encoder = msgspec.json.Encoder()
_exchange_decoder = msgspec.json.Decoder(Exchange)
_ops_decoder = msgspec.json.Decoder(list[Operation])


class Job(msgspec.Struct, kw_only=True):
    """A claimed job: the exchange to process and, once known, the LLM's decision."""

    id: str
    user_id: str
    exchange: Exchange
    attempts: int
    # The lease this claim holds; every later write about the job must present it.
    lease: str
    decision: list[Operation] | None = None


class JobInfo(msgspec.Struct, kw_only=True):
    """A job as reported to callers (no payload)."""

    id: str
    user_id: str
    agent_id: str | None
    session_id: str | None
    state: JobState
    attempts: int
    next_attempt_at: float
    last_error: str | None
    # Why a pending job waits (`no_key`, `model_unavailable`, or the category
    # of its last failure: it is retried) or why a failed one failed.
    reason: str | None = None
    created_at: float
    updated_at: float


class Outcomes(msgspec.Struct, kw_only=True):
    """Recent extraction outcomes (times: Unix seconds)."""

    last_success_at: float | None
    last_error: str | None
    last_error_reason: str | None
    last_error_at: float | None
    failing: bool


class Claim(msgspec.Struct, kw_only=True):
    job: Job | None
    # Seconds until some job becomes claimable, when none is now (None: none pending).
    wait: float | None = None


def _lag(db: sqlite3.Connection, now: float, allowed: str | None = None) -> float:
    sql = "SELECT MIN(next_attempt_at) FROM jobs WHERE state = 'pending' AND next_attempt_at <= ?"
    params: list[Any] = [now]
    if allowed is not None:
        sql += " AND user_id IN (SELECT value FROM json_each(?))"
        params.append(allowed)
    (due,) = db.execute(sql, params).fetchone()
    return 0.0 if due is None else max(0.0, now - due)


def _info(row: sqlite3.Row) -> JobInfo:
    return JobInfo(
        id=row["id"],
        user_id=row["user_id"],
        agent_id=row["agent_id"],
        session_id=row["session_id"],
        state=row["state"],
        attempts=row["attempts"],
        next_attempt_at=row["next_attempt_at"],
        last_error=row["last_error"],
        reason=row["reason"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
    )


def _migrate(db: sqlite3.Connection) -> None:
    """Bring a spool made by an older version up to this schema."""
    columns = {row[1] for row in db.execute("PRAGMA table_info(jobs)")}
    if "reason" not in columns:
        db.execute("ALTER TABLE jobs ADD COLUMN reason TEXT")


# How the extraction went lately, read from the jobs (every process sees the
# same file, so any serving process can report on the extraction process).
_RECENT = """
SELECT
    (SELECT MAX(updated_at) FROM jobs WHERE state = 'done') AS last_success_at,
    (SELECT COUNT(*) FROM jobs WHERE state = 'done' AND updated_at >= :since) AS recent_done,
    (SELECT COUNT(*) FROM jobs WHERE state IN ('pending', 'running', 'failed')
        AND updated_at >= :since AND last_error IS NOT NULL) AS recent_errors
"""
# A done job's error is cleared; the others keep their last one.
_LAST_ERROR = """
SELECT last_error, reason, updated_at FROM jobs
WHERE state IN ('pending', 'running', 'failed') AND last_error IS NOT NULL
ORDER BY updated_at DESC LIMIT 1
"""


class Spool:
    """The job queue. Open with `await Spool.open(path)`; close with `await close()`."""

    def __init__(self, path: Path, *, lease_seconds: float, clock: Callable[[], float]) -> None:
        self.path = path
        self.lease_seconds = lease_seconds
        self._clock = clock
        # The connection, its thread, and the group commit of job state changes.
        self._writer = GroupCommitWriter(thread_name=THREAD_NAME, busy_timeout_ms=_BUSY_TIMEOUT_MS)

    @classmethod
    async def open(
        cls,
        path: Path,
        *,
        lease_seconds: float = 30.0,
        clock: Callable[[], float] = time.time,
    ) -> Spool:
        spool = cls(path, lease_seconds=lease_seconds, clock=clock)
        await spool._writer.open(spool._connect)
        return spool

    def _connect(self) -> sqlite3.Connection:
        """Open the database; a corrupt one is moved aside and a fresh one started.

        Refusing to start would take every chat call down with the spool, and
        the jobs in a corrupt file cannot be read anyway; the moved file stays
        for inspection and the ERROR line names it.
        """
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            return self._open_db()
        except sqlite3.DatabaseError as exc:
            if (getattr(exc, "sqlite_errorcode", 0) & 0xFF) not in _CORRUPT:
                raise
            aside = self.path.with_name(f"{self.path.name}.corrupt-{int(self._clock())}")
            for suffix in ("", "-wal", "-shm"):
                part = self.path.with_name(self.path.name + suffix)
                if part.exists():
                    part.replace(aside.with_name(aside.name + suffix))
            log.error(
                "spool %s is corrupt (%s): moved to %s; starting with an empty spool,"
                " its unfinished exchanges are not extracted",
                self.path,
                exc,
                aside,
            )
            return self._open_db()

    def _open_db(self) -> sqlite3.Connection:
        db = sqlite3.connect(
            self.path,
            isolation_level=None,
            check_same_thread=False,
            timeout=_BUSY_TIMEOUT_MS / 1000,
        )
        try:
            db.row_factory = sqlite3.Row
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            db.execute(f"PRAGMA busy_timeout={_BUSY_TIMEOUT_MS}")
            db.executescript(_SCHEMA)
            _migrate(db)
        except BaseException:
            db.close()
            raise
        return db

    async def close(self) -> None:
        await self._writer.close()

    def _conn(self) -> sqlite3.Connection:
        return self._writer.conn()

    def _grouped(self, fn: Callable[[sqlite3.Connection], T]) -> Awaitable[T]:
        """Run `fn` in the next group commit (as the job writes below do)."""
        return self._writer.grouped(fn)

    # -- producing -----------------------------------------------------------

    async def enqueue(self, exchange: Exchange, *, reason: str | None = None) -> str:
        """Store the exchange durably; returns the job id once committed.
        `reason`: why it will wait (`no_key`), shown until it is claimed."""
        job_id = str(uuid.uuid4())
        payload = _encoder.encode(exchange)
        scope = exchange.scope

        def insert(db: sqlite3.Connection) -> None:
            now = self._clock()
            db.execute(
                "INSERT INTO jobs (id, user_id, agent_id, session_id, payload, state,"
                " reason, next_attempt_at, created_at, updated_at)"
                " VALUES (?, ?, ?, ?, ?, 'pending', ?, ?, ?, ?)",
                (
                    job_id,
                    scope.user_id,
                    scope.agent_id,
                    scope.session_id,
                    payload,
                    reason,
                    now,
                    now,
                    now,
                ),
            )

        await self._writer.grouped(insert)
        return job_id

    # -- consuming -----------------------------------------------------------

    async def claim(self, *, users: Iterable[str] | None = None) -> Claim:
        """Lease the next claimable job; `users` limits the choice (e.g. users with a key)."""
        allowed = None if users is None else json.dumps(sorted(set(users)))
        lease = str(uuid.uuid4())

        def claim(db: sqlite3.Connection) -> Claim:
            now = self._clock()
            where = ""
            params: list[Any] = []
            if allowed is not None:
                where = " WHERE j.user_id IN (SELECT value FROM json_each(?))"
                params.append(allowed)
            heads = db.execute(_HEADS + where, params).fetchall()
            held = dict(db.execute(_HELD, (now,)).fetchall())
            best: sqlite3.Row | None = None
            soonest: float | None = None
            for row in heads:
                if row["state"] == "pending":
                    due = row["next_attempt_at"]
                else:
                    due = row["lease_until"] if row["lease_until"] is not None else now
                due = max(due, held.get(row["user_id"], due))
                if due <= now:
                    if best is None or (row["next_attempt_at"], row["seq"]) < (
                        best["next_attempt_at"],
                        best["seq"],
                    ):
                        best = row
                elif soonest is None or due < soonest:
                    soonest = due
            if best is None:
                return Claim(job=None, wait=None if soonest is None else max(0.0, soonest - now))
            attempts = best["attempts"] + 1
            db.execute(
                "UPDATE jobs SET state = 'running', attempts = ?, lease_owner = ?,"
                " lease_until = ?, reason = NULL, updated_at = ? WHERE seq = ?",
                (attempts, lease, now + self.lease_seconds, now, best["seq"]),
            )
            payload, decision = db.execute(
                "SELECT payload, decision FROM jobs WHERE seq = ?", (best["seq"],)
            ).fetchone()
            return Claim(
                job=Job(
                    id=best["id"],
                    user_id=best["user_id"],
                    exchange=_exchange_decoder.decode(payload),
                    attempts=attempts,
                    lease=lease,
                    decision=None if decision is None else _ops_decoder.decode(decision),
                )
            )

        return await self._writer.grouped(claim)

    def _owned(self, db: sqlite3.Connection, job: Job, sql: str, params: Sequence[Any]) -> bool:
        cur = db.execute(
            sql + " WHERE id = ? AND lease_owner = ? AND state = 'running'",
            (*params, job.id, job.lease),
        )
        return cur.rowcount == 1

    async def heartbeat(self, job: Job) -> bool:
        """Extend the lease; False when it was lost (expired and taken, or job deleted)."""

        def renew(db: sqlite3.Connection) -> bool:
            now = self._clock()
            return self._owned(
                db, job, "UPDATE jobs SET lease_until = ?", (now + self.lease_seconds,)
            )

        return await self._writer.grouped(renew)

    async def owns(self, job: Job) -> bool:
        """Does this claim still hold the job? Checked right before applying."""

        def check(db: sqlite3.Connection) -> bool:
            row = db.execute(
                "SELECT 1 FROM jobs WHERE id = ? AND lease_owner = ? AND state = 'running'",
                (job.id, job.lease),
            ).fetchone()
            return row is not None

        return await self._writer.run(check, self._writer.conn())

    async def save_decision(self, job: Job, ops: Sequence[Operation]) -> bool:
        """Record the validated LLM answer so a replay never asks the model again."""
        decision = _encoder.encode(list(ops))

        def save(db: sqlite3.Connection) -> bool:
            return self._owned(
                db,
                job,
                "UPDATE jobs SET decision = ?, updated_at = ?",
                (decision, self._clock()),
            )

        ok = await self._writer.grouped(save)
        if ok:
            job.decision = list(ops)
        return ok

    async def complete(self, job: Job) -> bool:
        def done(db: sqlite3.Connection) -> bool:
            return self._owned(
                db,
                job,
                "UPDATE jobs SET state = 'done', lease_owner = NULL, lease_until = NULL,"
                " last_error = NULL, reason = NULL, updated_at = ?",
                (self._clock(),),
            )

        return await self._writer.grouped(done)

    async def fail(
        self,
        job: Job,
        error: str,
        *,
        retry_in: float | None,
        counted: bool = True,
        reason: str = "error",
    ) -> bool:
        """Record a failed attempt: back to pending after `retry_in` seconds, or parked.

        An attempt that is not `counted` (the model was unavailable) does not
        bring the job closer to being parked. `reason` is the failure's category.
        """
        # The claim counted the attempt; an uncounted one gives it back.
        refund = 0 if counted else 1

        def fail(db: sqlite3.Connection) -> bool:
            now = self._clock()
            if retry_in is None:
                return self._owned(
                    db,
                    job,
                    "UPDATE jobs SET state = 'failed', lease_owner = NULL, lease_until = NULL,"
                    " last_error = ?, reason = ?, updated_at = ?",
                    (error, reason, now),
                )
            return self._owned(
                db,
                job,
                "UPDATE jobs SET state = 'pending', lease_owner = NULL, lease_until = NULL,"
                " attempts = MAX(attempts - ?, 0), last_error = ?, reason = ?,"
                " next_attempt_at = ?, updated_at = ?",
                (refund, error, reason, now + retry_in, now),
            )

        return await self._writer.grouped(fail)

    async def release(self, job: Job, *, reason: str | None = None) -> bool:
        """Give the job back untouched (shutdown, or it waits: `reason`): due
        now, the attempt not counted."""

        def release(db: sqlite3.Connection) -> bool:
            return self._owned(
                db,
                job,
                "UPDATE jobs SET state = 'pending', lease_owner = NULL, lease_until = NULL,"
                " attempts = MAX(attempts - 1, 0), reason = ?, updated_at = ?",
                (reason, self._clock()),
            )

        return await self._writer.grouped(release)

    # -- management ----------------------------------------------------------

    async def get(self, job_id: str) -> JobInfo | None:
        def get(db: sqlite3.Connection) -> JobInfo | None:
            row = db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
            return None if row is None else _info(row)

        return await self._writer.run(get, self._writer.conn())

    async def decision(self, job_id: str) -> list[Operation] | None:
        """The operations decided for a job (empty: nothing to remember, or
        not decided yet); None for an unknown job."""

        def read(db: sqlite3.Connection) -> list[Operation] | None:
            row = db.execute("SELECT decision FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                return None
            return [] if row[0] is None else _ops_decoder.decode(row[0])

        return await self._writer.run(read, self._writer.conn())

    async def jobs(
        self, *, state: JobState | None = None, user_id: str | None = None, limit: int = 100
    ) -> list[JobInfo]:
        def select(db: sqlite3.Connection) -> list[JobInfo]:
            clauses: list[str] = []
            params: list[Any] = []
            if state is not None:
                clauses.append("state = ?")
                params.append(state)
            if user_id is not None:
                clauses.append("user_id = ?")
                params.append(user_id)
            where = f" WHERE {' AND '.join(clauses)}" if clauses else ""
            rows = db.execute(
                f"SELECT * FROM jobs{where} ORDER BY seq LIMIT ?",  # noqa: S608 (fixed clauses)
                (*params, limit),
            ).fetchall()
            return [_info(r) for r in rows]

        return await self._writer.run(select, self._writer.conn())

    async def retry_failed(self, user_id: str | None = None) -> int:
        """Put failed jobs back in the queue with fresh attempts."""

        def retry(db: sqlite3.Connection) -> int:
            now = self._clock()
            sql = (
                "UPDATE jobs SET state = 'pending', attempts = 0, next_attempt_at = ?,"
                " reason = NULL, updated_at = ? WHERE state = 'failed'"
            )
            params: list[Any] = [now, now]
            if user_id is not None:
                sql += " AND user_id = ?"
                params.append(user_id)
            return db.execute(sql, params).rowcount

        return await self._writer.transaction(retry)

    async def delete_user(self, user_id: str, agent_id: str | None = None) -> int:
        """Forget every job of a user (or of one of their agents), whatever its state."""

        def delete(db: sqlite3.Connection) -> int:
            if agent_id is None:
                return db.execute("DELETE FROM jobs WHERE user_id = ?", (user_id,)).rowcount
            return db.execute(
                "DELETE FROM jobs WHERE user_id = ? AND agent_id = ?", (user_id, agent_id)
            ).rowcount

        return await self._writer.transaction(delete)

    async def purge(self, older_than: float) -> int:
        """Remove done jobs finished more than `older_than` seconds ago."""

        def purge(db: sqlite3.Connection) -> int:
            cutoff = self._clock() - older_than
            return db.execute(
                "DELETE FROM jobs WHERE state = 'done' AND updated_at < ?", (cutoff,)
            ).rowcount

        return await self._writer.transaction(purge)

    async def stats(self) -> SpoolStats:
        def count(db: sqlite3.Connection) -> SpoolStats:
            counts = dict.fromkeys(("pending", "running", "failed", "done"), 0)
            for state, n in db.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state"):
                counts[state] = n
            return SpoolStats(**counts, lag_seconds=round(_lag(db, self._clock()), 3))

        return await self._writer.run(count, self._writer.conn())

    async def reasons(self) -> dict[str, dict[str, int]]:
        """Pending and failed jobs counted by reason (`none`: no reason recorded)."""

        def count(db: sqlite3.Connection) -> dict[str, dict[str, int]]:
            out: dict[str, dict[str, int]] = {"pending": {}, "failed": {}}
            for state, reason, n in db.execute(
                "SELECT state, COALESCE(reason, 'none'), COUNT(*) FROM jobs"
                " WHERE state IN ('pending', 'failed') GROUP BY 1, 2"
            ):
                out[state][reason] = n
            return out

        return await self._writer.run(count, self._writer.conn())

    async def outcomes(self, window: float) -> Outcomes:
        """How extraction went: the last success, the last error, and whether
        in the last `window` seconds jobs failed and none succeeded."""

        def read(db: sqlite3.Connection) -> Outcomes:
            since = self._clock() - window
            recent = db.execute(_RECENT, {"since": since}).fetchone()
            last = db.execute(_LAST_ERROR).fetchone()
            return Outcomes(
                last_success_at=recent["last_success_at"],
                last_error=None if last is None else last["last_error"],
                last_error_reason=None if last is None else last["reason"],
                last_error_at=None if last is None else last["updated_at"],
                failing=recent["recent_errors"] > 0 and recent["recent_done"] == 0,
            )

        return await self._writer.run(read, self._writer.conn())

    async def mark_waiting(self, reason: str, *, except_users: Iterable[str] = ()) -> int:
        """Give pending jobs without a reason this one (e.g. `no_key` after a
        restart, for users whose key this process does not know yet)."""
        skip = json.dumps(sorted(set(except_users)))

        def mark(db: sqlite3.Connection) -> int:
            return db.execute(
                "UPDATE jobs SET reason = ? WHERE state = 'pending' AND reason IS NULL"
                " AND user_id NOT IN (SELECT value FROM json_each(?))",
                (reason, skip),
            ).rowcount

        return await self._writer.transaction(mark)

    async def lag(self, *, users: Iterable[str] | None = None) -> float:
        """How long the longest-waiting due job has waited (seconds; 0 when
        none waits): how far memory is behind the conversations. `users`
        limits it to those users' jobs, as for `claim`."""
        allowed = None if users is None else json.dumps(sorted(set(users)))
        return await self._writer.run(_lag, self._writer.conn(), self._clock(), allowed)

    async def unfinished(self) -> int:
        """Pending plus running jobs."""

        def count(db: sqlite3.Connection) -> int:
            row = db.execute(
                "SELECT COUNT(*) FROM jobs WHERE state IN ('pending', 'running')"
            ).fetchone()
            return int(row[0])

        return await self._writer.run(count, self._writer.conn())
