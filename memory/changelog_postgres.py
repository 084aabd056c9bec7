"""The change log of replicas that share the memory tables on object storage
(`storage.uri`) and the queue in PostgreSQL (`queue.url`), in the queue's
database.

Each replica keeps a search cache. With a log only this machine's processes
write, a version committed by another machine says nothing of what it
changed, and the whole cache is dropped at each such version. In a log every
replica writes, a replica re-reads just the rows another changed, as the
processes of one machine do (memory/changelog.py explains the protocol).

Calls are blocking, like `ChangeLog`'s; the store runs them in a thread. A
connection the server dropped is replaced at the next call; an error reaches
the caller, which treats an unreadable log as unknown versions (the cache is
dropped: slower, never wrong).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterable
from typing import Any

import psycopg

from memory.changelog import KEEP_VERSIONS, NOBODY, Changes, decode_rows, encode_ids
from memory.spool_postgres import Target

_SCHEMA = """
CREATE TABLE IF NOT EXISTS memory_changes (
    version BIGINT NOT NULL,
    user_id TEXT NOT NULL,
    ids TEXT,
    PRIMARY KEY (version, user_id)
)
"""
# Replicas starting together create the table one at a time.
_SCHEMA_LOCK = 0x4D475704
# A database host that does not answer is given up on after this long.
CONNECT_TIMEOUT_SECONDS = 5


class PostgresChangeLog:
    shared = True

    def __init__(self, url: str) -> None:
        self._target = Target(url)
        self._lock = threading.Lock()
        self._db: psycopg.Connection[Any] | None = None
        with self._lock:
            self._conn()

    def _conn(self) -> psycopg.Connection[Any]:
        if self._db is not None and self._db.closed:
            self._db = None
        if self._db is None:
            db = self._target.connect_blocking(
                schema=_SCHEMA, schema_lock=_SCHEMA_LOCK, timeout=CONNECT_TIMEOUT_SECONDS
            )
            self._db = db
        return self._db

    def _drop(self) -> None:
        if self._db is not None:
            db, self._db = self._db, None
            with contextlib.suppress(psycopg.Error):
                db.close()

    def _insert(self, rows: list[tuple[int, str, str | None]]) -> None:
        if not rows:
            return
        with self._lock:
            try:
                db = self._conn()
                # One transaction: a reader sees all of a version's users or none.
                with db.transaction(), db.cursor() as cur:
                    cur.executemany(
                        "INSERT INTO memory_changes (version, user_id, ids) VALUES (%s, %s, %s)"
                        " ON CONFLICT DO NOTHING",
                        rows,
                    )
            except psycopg.OperationalError:
                self._drop()
                raise

    def record(self, version: int, changes: Changes) -> None:
        """The rows of each user that `version` changed."""
        self._insert([(version, user, encode_ids(ids)) for user, ids in changes.items()])

    def record_unchanged(self, versions: Iterable[int]) -> None:
        """Versions that changed no memory."""
        self._insert([(version, NOBODY, "[]") for version in versions])

    def logged(self, first: int, last: int) -> dict[int, dict[str, frozenset[str] | None]]:
        """What each logged version from `first` to `last` changed, by user."""
        with self._lock:
            try:
                rows = (
                    self._conn()
                    .execute(
                        "SELECT version, user_id, ids FROM memory_changes"
                        " WHERE version BETWEEN %s AND %s",
                        (first, last),
                    )
                    .fetchall()
                )
            except psycopg.OperationalError:
                self._drop()
                raise
        return decode_rows(rows)

    def prune(self, current: int) -> None:
        with self._lock:
            try:
                self._conn().execute(
                    "DELETE FROM memory_changes WHERE version < %s", (current - KEEP_VERSIONS,)
                )
            except psycopg.OperationalError:
                self._drop()
                raise

    def close(self) -> None:
        with self._lock:
            self._drop()
