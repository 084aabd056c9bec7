"""Which users each memories-table version changed, shared by the processes
that write one store (`server.workers`).

Each process keeps a search cache of users' memories. When the table moves
under it, the other process's write may have touched any user; without this
log the only safe answer is to drop the whole cache (a 10k-memory user costs
~0.3-0.7 s to reload). Writers record `(version, user)` right after their
commit; a reader that sees versions V0 -> V1 drops only the users recorded for
them. A version still unrecorded is waited for briefly (its writer records it
milliseconds after committing), then the whole cache is dropped: a writer that
died in between, compaction by maintenance and a pruned log cost speed, never
correctness.

SQLite in WAL mode, `synchronous=NORMAL`: a record lost to a power cut is a
gap, and gaps are safe. Calls are blocking; the store runs them in a thread.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterable
from pathlib import Path

_SCHEMA = """
CREATE TABLE IF NOT EXISTS changes (
    version INTEGER NOT NULL,
    user_id TEXT NOT NULL,
    PRIMARY KEY (version, user_id)
) WITHOUT ROWID;
"""
# Versions kept: a reader further behind than this reloads its whole cache.
KEEP_VERSIONS = 100_000


class ChangeLog:
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

    def record(self, version: int, users: Iterable[str]) -> None:
        """The users whose memories `version` changed."""
        rows = [(version, user) for user in set(users)]
        if not rows:
            return
        with self._lock:
            # One transaction: a reader sees all of a version's users or none.
            self._db.execute("BEGIN")
            try:
                self._db.executemany(
                    "INSERT OR IGNORE INTO changes (version, user_id) VALUES (?, ?)", rows
                )
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def logged(self, first: int, last: int) -> dict[int, set[str]]:
        """The users of each logged version from `first` to `last`; versions
        nobody logged (yet) are absent."""
        with self._lock:
            rows = self._db.execute(
                "SELECT version, user_id FROM changes WHERE version BETWEEN ? AND ?",
                (first, last),
            ).fetchall()
        out: dict[int, set[str]] = {}
        for version, user in rows:
            out.setdefault(version, set()).add(user)
        return out

    def prune(self, current: int) -> None:
        with self._lock:
            self._db.execute("DELETE FROM changes WHERE version < ?", (current - KEEP_VERSIONS,))

    def close(self) -> None:
        with self._lock:
            self._db.close()
