"""The extraction queue in PostgreSQL, shared by replicas on several machines.

The same interface and guarantees as the SQLite spool (memory/spool.py), whose
structs it returns; what differs is how each guarantee is kept:

- Durable before acknowledged: every write is its own committed transaction
  (the pool's connections are in autocommit), and a session whose server says
  `synchronous_commit = off` is raised to `on`, so `enqueue` returns after the
  commit is flushed (and replicated, where the server has synchronous standbys).
- One user strictly serial, users in parallel: a claim transaction takes the
  user's transaction-level advisory lock (`pg_try_advisory_xact_lock`) before
  it looks at that user's jobs again and updates one, so two claimers never
  decide about one user at the same time; a user held by another claimer is
  skipped, not waited for. A user is claimable only when none of their jobs
  runs under a live lease (not only when the oldest does not): in PostgreSQL
  `seq` values are drawn before commit, so a job can become visible after a
  later one of the same user was claimed.
- Leases, decisions, erasure: as in SQLite, every write about a claimed job
  names its lease (`lease_owner`), so a job taken over after its lease expired,
  or deleted by an erase on any replica, can no longer be completed by the
  worker that lost it, and `owns` says so before anything is applied.

Times (leases, backoff, ages) come from the injected clock, as in SQLite: the
replicas' clocks must agree to well within a lease (NTP does).

The maintenance lease across machines is a session-level advisory lock on a
connection of its own (`maintenance_lock`): the server releases it when that
connection closes or dies.

API keys are never written here: jobs carry the (already redacted) exchange
only. The URL's password is never logged (`masked_url`).
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from typing import Any
from urllib.parse import unquote

import msgspec
import psycopg
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from memory.models import Exchange, Operation, SpoolStats
from memory.spool import Claim, Job, JobInfo, JobState, Outcomes

log = logging.getLogger("memory.spool_postgres")

# Connections per replica: the workers' claims and writes, chats' enqueues and
# the stats readers share them; a caller waits for a free one up to the timeout.
POOL_MIN_SIZE = 1
POOL_MAX_SIZE = 8
POOL_TIMEOUT_SECONDS = 10.0
# An enqueue holds a chat's last bytes: with the server out of reach, the
# exchange is given up (logged as not recorded) after waiting this long for a
# pooled connection and one attempt of its own (`ALONE_CONNECT_SECONDS`), not
# after the pool's timeout.
ENQUEUE_TIMEOUT_SECONDS = 3.0
RECONNECT_TIMEOUT_SECONDS = 15.0
# The connection an enqueue makes on its own when the pool has none (above).
ALONE_CONNECT_SECONDS = 2
# Heads looked at per claim: the due ones, oldest first.
CLAIM_CANDIDATES = 16
# When every due user was being claimed by another replica: look again soon.
CONTENDED_WAIT_SECONDS = 0.05
# Advisory lock classes (the two-key form, so as not to meet other
# applications' one-key locks): one for users' claims, one for this schema's
# creation and maintenance.
_CLAIM_LOCKS = 0x4D475701
_SCHEMA_LOCKS = 0x4D475702

_SCHEMA = """
CREATE TABLE IF NOT EXISTS extraction_jobs (
    seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,
    user_id TEXT NOT NULL,
    agent_id TEXT,
    session_id TEXT,
    payload BYTEA NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('pending', 'running', 'done', 'failed')),
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at DOUBLE PRECISION NOT NULL,
    lease_owner TEXT,
    lease_until DOUBLE PRECISION,
    last_error TEXT,
    reason TEXT,
    decision BYTEA,
    created_at DOUBLE PRECISION NOT NULL,
    updated_at DOUBLE PRECISION NOT NULL
);
CREATE INDEX IF NOT EXISTS extraction_jobs_unfinished ON extraction_jobs (user_id, seq)
    WHERE state IN ('pending', 'running');
CREATE INDEX IF NOT EXISTS extraction_jobs_state ON extraction_jobs (state, updated_at);
CREATE INDEX IF NOT EXISTS extraction_jobs_running ON extraction_jobs (user_id)
    WHERE state = 'running';
"""

# Each user's head (the oldest unfinished job) and when it may be claimed: when
# due (pending) or when its lease ends (running), and never while another job
# of the user runs under a live lease. Due heads first, oldest due first; the
# window gives the soonest future due time over all of them.
_CANDIDATES = """
WITH RECURSIVE waiting AS (
    -- Each user with unfinished jobs, one index probe per user (a skip
    -- scan), however many jobs each has queued.
    (SELECT user_id FROM extraction_jobs
        WHERE state IN ('pending', 'running') ORDER BY user_id LIMIT 1)
    UNION ALL
    SELECT (SELECT j.user_id FROM extraction_jobs AS j
            WHERE j.state IN ('pending', 'running') AND j.user_id > w.user_id
            ORDER BY j.user_id LIMIT 1)
    FROM waiting AS w WHERE w.user_id IS NOT NULL
), heads AS (
    SELECT h.seq, h.user_id, h.state, h.next_attempt_at, h.lease_until
    FROM waiting AS w CROSS JOIN LATERAL (
        SELECT seq, user_id, state, next_attempt_at, lease_until FROM extraction_jobs AS j
        WHERE j.user_id = w.user_id AND j.state IN ('pending', 'running')
        ORDER BY j.seq LIMIT 1
    ) AS h
    WHERE w.user_id IS NOT NULL AND (%(all)s OR w.user_id = ANY(%(users)s))
), live AS (
    SELECT user_id, MAX(lease_until) AS until
    FROM extraction_jobs
    WHERE state = 'running' AND lease_until > %(now)s
        AND (%(all)s OR user_id = ANY(%(users)s))
    GROUP BY user_id
), due AS (
    SELECT h.seq, h.user_id, h.next_attempt_at,
        GREATEST(
            CASE WHEN h.state = 'pending' THEN h.next_attempt_at
                ELSE COALESCE(h.lease_until, %(now)s) END,
            COALESCE(l.until, '-Infinity'::float8)
        ) AS due
    FROM heads AS h LEFT JOIN live AS l ON l.user_id = h.user_id
)
SELECT seq, user_id, due, MIN(due) FILTER (WHERE due > %(now)s) OVER () AS soonest
FROM due
ORDER BY due > %(now)s, next_attempt_at, seq
LIMIT %(limit)s
"""

_LAG = """
SELECT MIN(next_attempt_at) AS due FROM extraction_jobs
WHERE state = 'pending' AND next_attempt_at <= %(now)s
    AND (%(all)s OR user_id = ANY(%(users)s))
"""

_RECENT = """
SELECT
    (SELECT MAX(updated_at) FROM extraction_jobs WHERE state = 'done') AS last_success_at,
    (SELECT COUNT(*) FROM extraction_jobs WHERE state = 'done' AND updated_at >= %(since)s)
        AS recent_done,
    (SELECT COUNT(*) FROM extraction_jobs WHERE state IN ('pending', 'running', 'failed')
        AND updated_at >= %(since)s AND last_error IS NOT NULL) AS recent_errors
"""
_LAST_ERROR = """
SELECT last_error, reason, updated_at FROM extraction_jobs
WHERE state IN ('pending', 'running', 'failed') AND last_error IS NOT NULL
ORDER BY updated_at DESC LIMIT 1
"""

_INFO_COLUMNS = (
    "id, user_id, agent_id, session_id, state, attempts, next_attempt_at,"
    " last_error, reason, created_at, updated_at"
)
_OWNED = " WHERE id = %s AND lease_owner = %s AND state = 'running'"

_encoder = msgspec.json.Encoder()
_exchange_decoder = msgspec.json.Decoder(Exchange)
_ops_decoder = msgspec.json.Decoder(list[Operation])

_PASSWORD_PARAM = re.compile(r"(?i)(password\s*=\s*)[^&\s]*")


def masked_url(url: str) -> str:
    """`url` with its password replaced by `***` (user info and `password=`
    parameters): safe to log. When unsure where the user info ends it masks
    more, never less."""
    scheme, sep, rest = url.partition("://")
    if sep:
        at = rest.rfind("@")
        if at >= 0:
            user, colon, _ = rest[:at].partition(":")
            if colon:
                rest = f"{user}:***{rest[at:]}"
        url = scheme + sep + rest
    return _PASSWORD_PARAM.sub(r"\1***", url)


def _passwords(url: str) -> list[str]:
    """The secrets `url` spells out (the user info's, `password=`'s), as
    written and percent-decoded: what must not appear in a message."""
    found: list[str] = []
    _, sep, rest = url.partition("://")
    at = rest.rfind("@") if sep else -1
    if at >= 0:
        _, colon, password = rest[:at].partition(":")
        if colon:
            found.append(password)
    found += (m.group(0).split("=", 1)[1].strip() for m in _PASSWORD_PARAM.finditer(url))
    found += [unquote(p) for p in found]
    return [p for p in found if p]


def _scrubbed(text: str, url: str) -> str:
    """`text` (an error message) with `url` masked and its passwords cut out."""
    text = text.replace(url, masked_url(url))
    for password in sorted(_passwords(url), key=len, reverse=True):
        text = text.replace(password, "***")
    return text


class Target:
    """Where the queue is: libpq's connection string without the password,
    which travels apart (`kwargs`), so that no libpq message quoting the
    connection string can carry it; `masked` is the URL to show."""

    def __init__(self, url: str) -> None:
        self.masked = masked_url(url)
        try:
            params = psycopg.conninfo.conninfo_to_dict(url)
        except psycopg.Error as exc:
            # Not chained: libpq quotes the whole URL in its parse errors.
            raise ValueError(
                f"queue.url is not a valid PostgreSQL URL ({self.masked}):"
                f" {_scrubbed(str(exc).strip(), url)}"
            ) from None
        password = params.pop("password", None)
        self.conninfo = psycopg.conninfo.make_conninfo("", **params)
        self.kwargs: dict[str, Any] = {} if password is None else {"password": password}
        self._url = url

    def scrub(self, text: str) -> str:
        return _scrubbed(text, self._url)

    async def connect(self, **options: Any) -> psycopg.AsyncConnection[Any]:
        return await psycopg.AsyncConnection.connect(
            self.conninfo, autocommit=True, **options, **self.kwargs
        )

    def connect_blocking(
        self, *, schema: str, schema_lock: int, timeout: int
    ) -> psycopg.Connection[Any]:
        """An autocommit connection for code that runs in a thread (the
        change log, the issued keys), with `schema` created first under the
        advisory lock `schema_lock` (replicas may start together). Errors
        come scrubbed: libpq's messages may quote the connection string."""
        try:
            db = psycopg.connect(
                self.conninfo, autocommit=True, connect_timeout=timeout, **self.kwargs
            )
        except psycopg.Error as exc:
            raise psycopg.OperationalError(self.scrub(str(exc))) from None
        try:
            with db.transaction():
                db.execute("SELECT pg_advisory_xact_lock(%s)", (schema_lock,))
                db.execute(schema)
        except BaseException:
            db.close()
            raise
        return db


def _users_param(users: Iterable[str] | None) -> dict[str, Any]:
    """The `%(all)s OR user_id = ANY(%(users)s)` parameters."""
    if users is None:
        return {"all": True, "users": []}
    return {"all": False, "users": sorted(set(users))}


def _info(row: dict[str, Any]) -> JobInfo:
    return JobInfo(**row)


async def _configure(conn: psycopg.AsyncConnection[Any]) -> None:
    """Make commits durable on this session whatever the server's default:
    `off` acknowledges before the WAL is flushed (an acknowledged exchange
    could be lost in a crash); `local`, `on` and stronger are kept.

    Claims rely on READ COMMITTED (each statement sees what committed before
    it), whatever `default_transaction_isolation` says."""
    await conn.set_isolation_level(psycopg.IsolationLevel.READ_COMMITTED)
    cur = await conn.execute("SHOW synchronous_commit")
    row = await cur.fetchone()
    if row is not None and row[0] == "off":
        await conn.execute("SET synchronous_commit = on")


class AdvisoryLock:
    """A session-level advisory lock on a connection of its own, with
    `FileLock`'s `acquire`/`release`: the maintenance lease across machines.

    The server drops the lock when the connection closes or dies, so a
    crashed holder never keeps it; a holder whose connection died finds out
    at its next `acquire` and competes for the lock again like the others."""

    def __init__(
        self,
        target: Target,
        key_sql: str,
        key_params: Sequence[Any],
        *,
        name: str = "the maintenance lock",
    ) -> None:
        self._target = target
        # What the lock is for, in log lines.
        self._name = name
        self._key_sql = key_sql
        self._key_params = tuple(key_params)
        self._conn: psycopg.AsyncConnection[Any] | None = None
        self._held = False
        # Connections given up by `release`, unlocking and closing in the background.
        self._closing: set[asyncio.Task[None]] = set()

    @property
    def held(self) -> bool:
        return self._held

    async def acquire(self, *, blocking: bool = True) -> bool:
        """Take the lock (`blocking`: wait for it); True while it is held.
        A failure to reach the server counts as not holding it."""
        if self._held and self._conn is not None:
            try:
                await self._conn.execute("SELECT 1")
                return True
            except psycopg.Error:
                log.warning("the connection holding %s was lost", self._name)
                self._drop()
        try:
            if self._conn is None or self._conn.closed:
                self._conn = await self._target.connect()
            if blocking:
                # Returns once the lock is ours (void).
                sql = f"SELECT true FROM pg_advisory_lock({self._key_sql})"  # noqa: S608
            else:
                sql = f"SELECT pg_try_advisory_lock({self._key_sql})"
            cur = await self._conn.execute(sql, self._key_params)
            row = await cur.fetchone()
        except psycopg.Error as exc:
            log.warning("%s: %s", self._name, self._target.scrub(str(exc)))
            self._drop()
            return False
        except BaseException:
            # Cancelled while waiting: the lock may still be granted to that
            # session later, so the session goes.
            self._drop()
            raise
        self._held = bool(row and row[0])
        return self._held

    def release(self) -> None:
        """Give the lock up (in the background: `release` is called from
        synchronous code; `aclose` waits for it)."""
        self._drop()

    def _drop(self) -> None:
        conn, self._conn = self._conn, None
        held, self._held = self._held, False
        if conn is not None:
            task = asyncio.get_running_loop().create_task(self._let_go(conn, held))
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    async def _let_go(self, conn: psycopg.AsyncConnection[Any], held: bool) -> None:
        """Unlock, then close. The unlock returns once the lock is free; a
        closed connection frees it too, but only when the server has noticed."""
        try:
            if held and not conn.broken:
                await conn.execute(
                    f"SELECT pg_advisory_unlock({self._key_sql})",
                    self._key_params,
                )
        except psycopg.Error:
            pass  # the connection is going anyway, and the lock with it
        finally:
            await conn.close()

    async def aclose(self) -> None:
        self._drop()
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)


def opening_lock(url: str) -> AdvisoryLock:
    """The lock replicas sharing the queue at `url` open their stores under,
    one at a time: the first creates the shared tables and their indices,
    the others find them (created at once, their commits conflict)."""
    return AdvisoryLock(
        Target(url),
        "%s, hashtext('open ' || current_schema())",
        (_SCHEMA_LOCKS,),
        name="the lock replicas open their store under",
    )


class PostgresSpool:
    """The job queue in PostgreSQL. Open with `await PostgresSpool.open(url)`;
    close with `await close()`."""

    def __init__(
        self,
        target: Target,
        pool: AsyncConnectionPool[psycopg.AsyncConnection[Any]],
        *,
        lease_seconds: float,
        clock: Callable[[], float],
    ) -> None:
        self._target = target
        # The URL as it may be shown (password masked).
        self.url = target.masked
        self._pool = pool
        self.lease_seconds = lease_seconds
        self._clock = clock
        self._locks: list[AdvisoryLock] = []
        # This replica's workers claim one at a time: woken together, they
        # would otherwise all read the same candidates and race for the same
        # users' locks (a claim is about a millisecond; replicas still claim
        # side by side, kept apart by the locks).
        self._claiming = asyncio.Lock()

    @classmethod
    async def open(
        cls,
        url: str,
        *,
        lease_seconds: float = 30.0,
        clock: Callable[[], float] = time.time,
    ) -> PostgresSpool:
        """Connect and create the schema if it is missing (several replicas
        may start at once: one creates it under an advisory lock)."""
        target = Target(url)
        pool: AsyncConnectionPool[psycopg.AsyncConnection[Any]] = AsyncConnectionPool(
            target.conninfo,
            min_size=POOL_MIN_SIZE,
            max_size=POOL_MAX_SIZE,
            timeout=POOL_TIMEOUT_SECONDS,
            kwargs={"autocommit": True, **target.kwargs},
            configure=_configure,
            # A connection the server dropped (a restart, a failover) is
            # replaced before it is handed out, instead of failing a job write.
            check=AsyncConnectionPool.check_connection,
            # The pool retries a server that is down with a backoff that
            # doubles; giving up after this long starts the next attempt from
            # a second again, so a queue back after a long outage is used
            # again within seconds, not minutes.
            reconnect_timeout=RECONNECT_TIMEOUT_SECONDS,
            name="extraction-queue",
            open=False,
        )
        try:
            await pool.open(wait=True, timeout=POOL_TIMEOUT_SECONDS)
            async with pool.connection() as conn, conn.transaction():
                await conn.execute(
                    "SELECT pg_advisory_xact_lock(%s, hashtext('schema ' || current_schema()))",
                    (_SCHEMA_LOCKS,),
                )
                await conn.execute(_SCHEMA)
        except BaseException as exc:
            await pool.close()
            if isinstance(exc, Exception):
                # Not chained: the original text might quote the connection.
                raise ConnectionError(
                    f"cannot open the extraction queue at {target.masked}:"
                    f" {target.scrub(str(exc) or type(exc).__name__)}"
                ) from None
            raise
        log.info("extraction queue: PostgreSQL at %s", target.masked)
        return cls(target, pool, lease_seconds=lease_seconds, clock=clock)

    async def close(self) -> None:
        for lock in self._locks:
            await lock.aclose()
        self._locks.clear()
        await self._pool.close()

    def maintenance_lock(self) -> AdvisoryLock:
        """The lease that elects one maintaining process among every replica
        sharing this queue (this database schema)."""
        lock = AdvisoryLock(
            self._target, "%s, hashtext('maintenance ' || current_schema())", (_SCHEMA_LOCKS,)
        )
        self._locks.append(lock)
        return lock

    async def _execute(
        self,
        sql: str,
        params: Sequence[Any] | dict[str, Any] = (),
        *,
        wait: float | None = None,
    ) -> int:
        """One statement in its own committed transaction; its row count.
        `wait`: the longest wait for a connection (default: the pool's)."""
        async with self._pool.connection(timeout=wait) as conn:
            cur = await conn.execute(sql, params)
            return cur.rowcount

    async def _fetchone(
        self, sql: str, params: Sequence[Any] | dict[str, Any] = ()
    ) -> dict[str, Any] | None:
        async with self._pool.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
            await cur.execute(sql, params)
            return await cur.fetchone()

    async def _fetchall(
        self, sql: str, params: Sequence[Any] | dict[str, Any] = ()
    ) -> list[dict[str, Any]]:
        async with self._pool.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
            await cur.execute(sql, params)
            return await cur.fetchall()

    # -- producing -----------------------------------------------------------

    async def enqueue(self, exchange: Exchange, *, reason: str | None = None) -> str:
        """Store the exchange durably; returns the job id once committed.
        `reason`: why it will wait (`no_key`), shown until it is claimed.

        A connection lost mid-statement is retried once: the insert is keyed
        by the job's id, so a commit whose answer was lost is not doubled."""
        job_id = str(uuid.uuid4())
        payload = _encoder.encode(exchange)
        scope = exchange.scope
        now = self._clock()
        params = (
            job_id,
            scope.user_id,
            scope.agent_id,
            scope.session_id,
            payload,
            reason,
            now,
            now,
            now,
        )
        sql = (
            "INSERT INTO extraction_jobs (id, user_id, agent_id, session_id, payload, state,"
            " reason, next_attempt_at, created_at, updated_at)"
            " VALUES (%s, %s, %s, %s, %s, 'pending', %s, %s, %s, %s)"
            " ON CONFLICT (id) DO NOTHING"
        )
        try:
            await self._execute(sql, params, wait=ENQUEUE_TIMEOUT_SECONDS)
        except PoolTimeout:
            # No pooled connection: the server was away, and the pool may be
            # between two reconnection attempts although it is back. One
            # connection of its own tells, without waiting for the pool.
            await self._insert_alone(sql, params)
        except psycopg.OperationalError as exc:
            log.warning("enqueue: %s; trying once more", self._target.scrub(str(exc)))
            await self._execute(sql, params, wait=ENQUEUE_TIMEOUT_SECONDS)
        return job_id

    async def _insert_alone(self, sql: str, params: Sequence[Any]) -> None:
        try:
            conn = await self._target.connect(connect_timeout=ALONE_CONNECT_SECONDS)
        except psycopg.Error as exc:
            raise psycopg.OperationalError(self._target.scrub(str(exc))) from None
        async with conn:
            await _configure(conn)
            await conn.execute(sql, params)

    # -- consuming -----------------------------------------------------------

    async def claim(self, *, users: Iterable[str] | None = None) -> Claim:
        """Lease the next claimable job; `users` limits the choice (e.g. users with a key)."""
        lease = str(uuid.uuid4())
        async with self._claiming:
            return await self._claim(lease, users)

    async def _claim(self, lease: str, users: Iterable[str] | None) -> Claim:
        now = self._clock()
        params = {**_users_param(users), "now": now, "limit": CLAIM_CANDIDATES}
        async with self._pool.connection() as conn, conn.transaction():
            cur = await conn.execute(_CANDIDATES, params)
            heads = await cur.fetchall()
            if not heads:
                return Claim(job=None, wait=None)
            for _seq, user_id, due, _soonest in heads:
                if due > now:
                    break
                job = await self._claim_user(conn, user_id, lease, now)
                if job is not None:
                    return Claim(job=job)
            soonest = heads[0][3]
            if heads[0][2] <= now:
                # Due users, but each was being claimed by another replica
                # (or changed since the candidates were read): look again soon.
                wait = CONTENDED_WAIT_SECONDS
                if soonest is not None:
                    wait = min(wait, max(0.0, soonest - now))
                return Claim(job=None, wait=wait)
            return Claim(job=None, wait=None if soonest is None else max(0.0, soonest - now))

    async def _claim_user(
        self, conn: psycopg.AsyncConnection[Any], user_id: str, lease: str, now: float
    ) -> Job | None:
        """Claim `user_id`'s head if it is still claimable once the user's
        claim lock is ours; None when another claimer holds the lock or the
        user's jobs changed since the candidates were read."""
        cur = await conn.execute(
            "SELECT pg_try_advisory_xact_lock(%s, hashtext(%s))", (_CLAIM_LOCKS, user_id)
        )
        row = await cur.fetchone()
        if not (row and row[0]):
            return None
        # A fresh statement, so a fresh snapshot: it sees every claim of this
        # user committed before the lock was ours. The user's head, unless
        # any job of theirs runs under a live lease (two index probes, not a
        # read of their whole backlog).
        cur = await conn.execute(
            "SELECT seq, state, next_attempt_at, lease_until FROM extraction_jobs"
            " WHERE user_id = %(user)s AND state IN ('pending', 'running')"
            " AND NOT EXISTS (SELECT 1 FROM extraction_jobs"
            "   WHERE user_id = %(user)s AND state = 'running' AND lease_until > %(now)s)"
            " ORDER BY seq LIMIT 1",
            {"user": user_id, "now": now},
        )
        head = await cur.fetchone()
        if head is None:
            return None
        seq, state, next_attempt_at, lease_until = head
        due = (
            next_attempt_at
            if state == "pending"
            else (lease_until if lease_until is not None else now)
        )
        if due > now:
            return None
        cur = await conn.execute(
            "UPDATE extraction_jobs SET state = 'running', attempts = attempts + 1,"
            " lease_owner = %s, lease_until = %s, reason = NULL, updated_at = %s"
            " WHERE seq = %s AND state IN ('pending', 'running')"
            " RETURNING id, attempts, payload, decision",
            (lease, now + self.lease_seconds, now, seq),
        )
        claimed = await cur.fetchone()
        if claimed is None:  # erased meanwhile
            return None
        job_id, attempts, payload, decision = claimed
        return Job(
            id=job_id,
            user_id=user_id,
            exchange=_exchange_decoder.decode(payload),
            attempts=attempts,
            lease=lease,
            decision=None if decision is None else _ops_decoder.decode(decision),
        )

    async def _owned(self, job: Job, sql: str, params: Sequence[Any]) -> bool:
        return await self._execute(sql + _OWNED, (*params, job.id, job.lease)) == 1

    async def heartbeat(self, job: Job) -> bool:
        """Extend the lease; False when it was lost (expired and taken, or job deleted)."""
        return await self._owned(
            job,
            "UPDATE extraction_jobs SET lease_until = %s",
            (self._clock() + self.lease_seconds,),
        )

    async def owns(self, job: Job) -> bool:
        """Does this claim still hold the job? Checked right before applying."""
        row = await self._fetchone(
            "SELECT 1 AS held FROM extraction_jobs"
            " WHERE id = %s AND lease_owner = %s AND state = 'running'",
            (job.id, job.lease),
        )
        return row is not None

    async def save_decision(self, job: Job, ops: Sequence[Operation]) -> bool:
        """Record the validated LLM answer so a replay never asks the model again."""
        decision = _encoder.encode(list(ops))
        ok = await self._owned(
            job,
            "UPDATE extraction_jobs SET decision = %s, updated_at = %s",
            (decision, self._clock()),
        )
        if ok:
            job.decision = list(ops)
        return ok

    async def complete(self, job: Job) -> bool:
        return await self._owned(
            job,
            "UPDATE extraction_jobs SET state = 'done', lease_owner = NULL, lease_until = NULL,"
            " last_error = NULL, reason = NULL, updated_at = %s",
            (self._clock(),),
        )

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
        now = self._clock()
        if retry_in is None:
            return await self._owned(
                job,
                "UPDATE extraction_jobs SET state = 'failed', lease_owner = NULL,"
                " lease_until = NULL, last_error = %s, reason = %s, updated_at = %s",
                (error, reason, now),
            )
        # The claim counted the attempt; an uncounted one gives it back.
        refund = 0 if counted else 1
        return await self._owned(
            job,
            "UPDATE extraction_jobs SET state = 'pending', lease_owner = NULL,"
            " lease_until = NULL, attempts = GREATEST(attempts - %s, 0), last_error = %s,"
            " reason = %s, next_attempt_at = %s, updated_at = %s",
            (refund, error, reason, now + retry_in, now),
        )

    async def release(self, job: Job, *, reason: str | None = None) -> bool:
        """Give the job back untouched (shutdown, or it waits: `reason`): due
        now, the attempt not counted."""
        return await self._owned(
            job,
            "UPDATE extraction_jobs SET state = 'pending', lease_owner = NULL, lease_until = NULL,"
            " attempts = GREATEST(attempts - 1, 0), reason = %s, updated_at = %s",
            (reason, self._clock()),
        )

    # -- management ----------------------------------------------------------

    async def get(self, job_id: str) -> JobInfo | None:
        row = await self._fetchone(
            f"SELECT {_INFO_COLUMNS} FROM extraction_jobs WHERE id = %s",  # noqa: S608
            (job_id,),
        )
        return None if row is None else _info(row)

    async def decision(self, job_id: str) -> list[Operation] | None:
        """The operations decided for a job (empty: nothing to remember, or
        not decided yet); None for an unknown job."""
        row = await self._fetchone("SELECT decision FROM extraction_jobs WHERE id = %s", (job_id,))
        if row is None:
            return None
        return [] if row["decision"] is None else _ops_decoder.decode(row["decision"])

    async def jobs(
        self, *, state: JobState | None = None, user_id: str | None = None, limit: int = 100
    ) -> list[JobInfo]:
        clauses: list[str] = []
        params: list[Any] = []
        if state is not None:
            clauses.append("state = %s")
            params.append(state)
        if user_id is not None:
            clauses.append("user_id = %s")
            params.append(user_id)
        where = f" WHERE {' AND '.join(clauses)}" if clauses else ""
        rows = await self._fetchall(
            f"SELECT {_INFO_COLUMNS} FROM extraction_jobs{where} ORDER BY seq LIMIT %s",  # noqa: S608 (fixed clauses)
            (*params, limit),
        )
        return [_info(r) for r in rows]

    async def retry_failed(self, user_id: str | None = None) -> int:
        """Put failed jobs back in the queue with fresh attempts."""
        now = self._clock()
        sql = (
            "UPDATE extraction_jobs SET state = 'pending', attempts = 0, next_attempt_at = %s,"
            " reason = NULL, updated_at = %s WHERE state = 'failed'"
        )
        params: list[Any] = [now, now]
        if user_id is not None:
            sql += " AND user_id = %s"
            params.append(user_id)
        return await self._execute(sql, params)

    async def delete_user(self, user_id: str, agent_id: str | None = None) -> int:
        """Forget every job of a user (or of one of their agents), whatever its state."""
        if agent_id is None:
            return await self._execute("DELETE FROM extraction_jobs WHERE user_id = %s", (user_id,))
        return await self._execute(
            "DELETE FROM extraction_jobs WHERE user_id = %s AND agent_id = %s", (user_id, agent_id)
        )

    async def purge(self, older_than: float) -> int:
        """Remove done jobs finished more than `older_than` seconds ago."""
        return await self._execute(
            "DELETE FROM extraction_jobs WHERE state = 'done' AND updated_at < %s",
            (self._clock() - older_than,),
        )

    async def stats(self) -> SpoolStats:
        now = self._clock()
        counts = dict.fromkeys(("pending", "running", "failed", "done"), 0)
        for row in await self._fetchall(
            "SELECT state, COUNT(*) AS n FROM extraction_jobs GROUP BY state"
        ):
            counts[row["state"]] = row["n"]
        return SpoolStats(**counts, lag_seconds=round(await self._lag(now, None), 3))

    async def reasons(self) -> dict[str, dict[str, int]]:
        """Pending and failed jobs counted by reason (`none`: no reason recorded)."""
        out: dict[str, dict[str, int]] = {"pending": {}, "failed": {}}
        for row in await self._fetchall(
            "SELECT state, COALESCE(reason, 'none') AS reason, COUNT(*) AS n FROM extraction_jobs"
            " WHERE state IN ('pending', 'failed') GROUP BY 1, 2"
        ):
            out[row["state"]][row["reason"]] = row["n"]
        return out

    async def outcomes(self, window: float) -> Outcomes:
        """How extraction went: the last success, the last error, and whether
        in the last `window` seconds jobs failed and none succeeded."""
        since = self._clock() - window
        recent = await self._fetchone(_RECENT, {"since": since})
        last = await self._fetchone(_LAST_ERROR)
        assert recent is not None  # an aggregate always has its row
        return Outcomes(
            last_success_at=recent["last_success_at"],
            last_error=None if last is None else last["last_error"],
            last_error_reason=None if last is None else last["reason"],
            last_error_at=None if last is None else last["updated_at"],
            failing=recent["recent_errors"] > 0 and recent["recent_done"] == 0,
        )

    async def mark_waiting(self, reason: str, *, except_users: Iterable[str] = ()) -> int:
        """Give pending jobs without a reason this one (e.g. `no_key` after a
        restart, for users whose key this process does not know yet)."""
        return await self._execute(
            "UPDATE extraction_jobs SET reason = %s WHERE state = 'pending' AND reason IS NULL"
            " AND NOT (user_id = ANY(%s))",
            (reason, sorted(set(except_users))),
        )

    async def lag(self, *, users: Iterable[str] | None = None) -> float:
        """How long the longest-waiting due job has waited (seconds; 0 when
        none waits): how far memory is behind the conversations. `users`
        limits it to those users' jobs, as for `claim`."""
        return await self._lag(self._clock(), users)

    async def _lag(self, now: float, users: Iterable[str] | None) -> float:
        row = await self._fetchone(_LAG, {**_users_param(users), "now": now})
        due = None if row is None else row["due"]
        return 0.0 if due is None else max(0.0, now - due)

    async def unfinished(self) -> int:
        """Pending plus running jobs."""
        row = await self._fetchone(
            "SELECT COUNT(*) AS n FROM extraction_jobs WHERE state IN ('pending', 'running')"
        )
        return 0 if row is None else int(row["n"])
