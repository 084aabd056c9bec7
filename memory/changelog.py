"""Which memories each memories-table version changed, shared by the
processes that write one store (`server.workers`, the extraction process).

Each process keeps a search cache of users' memories. When the table moves
under it, the other process's write may have touched any user; without this
log the only safe answer is to drop the whole cache (a 10k-memory user costs
~0.3-0.7 s to reload). Writers record `(version, user, ids)` right after
their commit; a reader that sees versions V0 -> V1 re-reads just those rows
of the users it has cached (`ids` NULL: the whole user, reloaded).
Maintenance records its own versions (compaction, index updates) as changing
nothing: it runs while no other process can commit (the store's write lock,
shared by writers, exclusive for maintenance), so every version in its span
is its own. A version still unrecorded is waited for briefly (its writer
records it milliseconds after committing), then the whole cache is dropped:
a writer that died in between, or a pruned log, costs speed, never
correctness.

SQLite in WAL mode, `synchronous=NORMAL`: a record lost to a power cut is a
gap, and gaps are safe. Calls are blocking; the store runs them in a thread.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Collection, Iterable, Mapping
from pathlib import Path
from typing import Protocol

import msgspec

_SCHEMA = """
DROP TABLE IF EXISTS changes;
CREATE TABLE IF NOT EXISTS changed_rows (
    version INTEGER NOT NULL,
    user_id TEXT NOT NULL,
    ids TEXT,
    PRIMARY KEY (version, user_id)
) WITHOUT ROWID;
"""
# Versions kept: a reader further behind than this reloads its whole cache.
KEEP_VERSIONS = 100_000
# A write of more rows than this for one user is logged as "the whole user":
# re-reading that many rows by id costs more than reloading the scope.
MAX_IDS = 256

# The user of a version logged as changing no memory (user ids are never empty).
NOBODY = ""

# user_id -> the ids a version changed, or None for "any of that user's rows".
Changes = Mapping[str, Collection[str] | None]


class VersionLog(Protocol):
    """A change log: this machine's (`ChangeLog`), or one every replica shares
    (memory/changelog_postgres.py)."""

    # Whether other machines' writers record in it too: then a version not
    # logged yet may be another machine's writer about to log it.
    shared: bool

    def record(self, version: int, changes: Changes) -> None: ...

    def record_unchanged(self, versions: Iterable[int]) -> None: ...

    def logged(self, first: int, last: int) -> dict[int, dict[str, frozenset[str] | None]]: ...

    def prune(self, current: int) -> None: ...

    def close(self) -> None: ...


def encode_ids(ids: Collection[str] | None) -> str | None:
    """A version's ids of one user as stored: None for "the whole user"."""
    if ids is None or len(ids) > MAX_IDS:
        return None
    return msgspec.json.encode(sorted(ids)).decode()


def decode_rows(
    rows: Iterable[tuple[int, str, str | None]],
) -> dict[int, dict[str, frozenset[str] | None]]:
    """Stored `(version, user, ids)` rows as `logged` returns them."""
    out: dict[int, dict[str, frozenset[str] | None]] = {}
    for version, user, ids in rows:
        changes = out.setdefault(version, {})
        if user != NOBODY:
            changes[user] = (
                None if ids is None else frozenset(msgspec.json.decode(ids, type=list[str]))
            )
    return out


class ChangeLog:
    """The log of one machine's processes, in SQLite beside the tables."""

    shared = False

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(
            self.path, isolation_level=None, check_same_thread=False, timeout=30.0
        )
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("PRAGMA busy_timeout=30000")
        self._db.executescript(_SCHEMA)

    def record(self, version: int, changes: Changes) -> None:
        """The rows of each user that `version` changed."""
        self._insert([(version, user, encode_ids(ids)) for user, ids in changes.items()])

    def record_unchanged(self, versions: Iterable[int]) -> None:
        """Versions that changed no memory (compaction, index updates): other
        processes' caches stay as they are."""
        self._insert([(version, NOBODY, "[]") for version in versions])

    def _insert(self, rows: list[tuple[int, str, str | None]]) -> None:
        if not rows:
            return
        with self._lock:
            # One transaction: a reader sees all of a version's users or none.
            self._db.execute("BEGIN")
            try:
                self._db.executemany(
                    "INSERT OR IGNORE INTO changed_rows (version, user_id, ids) VALUES (?, ?, ?)",
                    rows,
                )
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def logged(self, first: int, last: int) -> dict[int, dict[str, frozenset[str] | None]]:
        """What each logged version from `first` to `last` changed, by user;
        versions nobody logged (yet) are absent."""
        with self._lock:
            rows = self._db.execute(
                "SELECT version, user_id, ids FROM changed_rows WHERE version BETWEEN ? AND ?",
                (first, last),
            ).fetchall()
        return decode_rows(rows)

    def prune(self, current: int) -> None:
        with self._lock:
            self._db.execute(
                "DELETE FROM changed_rows WHERE version < ?", (current - KEEP_VERSIONS,)
            )

    def close(self) -> None:
        with self._lock:
            self._db.close()


def merged(
    logged: Mapping[int, Mapping[str, frozenset[str] | None]],
) -> dict[str, set[str] | None]:
    """The union, by user, of several versions' changes (None absorbs)."""
    out: dict[str, set[str] | None] = {}
    for changes in logged.values():
        for user, ids in changes.items():
            if user in out and out[user] is None:
                continue
            if ids is None:
                out[user] = None
            else:
                known = out.setdefault(user, set())
                assert known is not None
                known.update(ids)
    return out
