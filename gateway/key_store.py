"""Per-user gateway keys issued at run time (`POST /v1/keys`), beside gateway.yaml's.

A key is shown once, when it is created; the store keeps its SHA-256 digest,
never the key. A key may carry the upstream key to use on its user's behalf:
that one must be sent upstream, so it cannot be hashed; it is stored only
encrypted (AES-GCM, with a key derived from `auth.keys_secret`, which lives
in the environment, never in the data directory), and refused without one.

The table is `<data_dir>/keys.sqlite3`, shared by every worker process; with
`queue.url` on PostgreSQL it is a table there (`gateway_keys`), shared by
every replica. Each process keeps the active keys in memory and re-reads
them when the table changed (SQLite's `PRAGMA data_version`; a counter
bumped with each change on PostgreSQL), checked twice a second by a
background task: a key created or revoked on one worker or replica works, or
stops working, on every other within a second. Every database call runs in
a thread, off the event loop.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import logging
import os
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from gateway.config import UserKey

logger = logging.getLogger("gateway")
T = TypeVar("T")

FILE = "keys.sqlite3"
# Every issued key starts so: a revoked or expired one is recognised (and
# refused) instead of being passed upstream as if it were the client's own.
PREFIX = "mgk-"
REFRESH_SECONDS = 0.5
# A database host that does not answer is given up on after this long.
CONNECT_TIMEOUT_SECONDS = 5
_SCHEMA = """
CREATE TABLE IF NOT EXISTS keys (
    id TEXT PRIMARY KEY,
    user_id TEXT NOT NULL,
    name TEXT,
    digest BLOB NOT NULL UNIQUE,
    hint TEXT NOT NULL,
    upstream_key BLOB,
    created_at REAL NOT NULL,
    expires_at REAL
)
"""
_PG_SCHEMA = """
CREATE TABLE IF NOT EXISTS gateway_keys (
    id TEXT PRIMARY KEY,
    user_id TEXT NOT NULL,
    name TEXT,
    digest BYTEA NOT NULL UNIQUE,
    hint TEXT NOT NULL,
    upstream_key BYTEA,
    created_at DOUBLE PRECISION NOT NULL,
    expires_at DOUBLE PRECISION
);
CREATE TABLE IF NOT EXISTS gateway_keys_version (
    one BOOLEAN PRIMARY KEY DEFAULT TRUE CHECK (one),
    version BIGINT NOT NULL
);
INSERT INTO gateway_keys_version VALUES (TRUE, 0) ON CONFLICT DO NOTHING;
"""
# Replicas starting together create the tables one at a time.
_PG_SCHEMA_LOCK = 0x4D475703
# One key's row, in the tables' column order.
Row = tuple[str, str, str | None, bytes, str, bytes | None, float, float | None]


class KeySecretMissing(Exception):
    """An upstream key cannot be stored: no `auth.keys_secret` to encrypt it with."""


@dataclass(frozen=True, slots=True)
class IssuedKey:
    """A key as listed: everything but the key itself."""

    id: str
    user_id: str
    name: str | None
    # The key's last four characters, to tell keys apart.
    hint: str
    has_upstream_key: bool
    created_at: float
    expires_at: float | None


@dataclass(frozen=True, slots=True)
class _Active:
    key: IssuedKey
    upstream_key: bytes | None


def digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


class _Cipher:
    """AES-GCM with a key derived from the operator's secret; the key id is
    authenticated with each ciphertext, so a blob cannot be moved to another key."""

    def __init__(self, secret: str) -> None:
        self._aead = AESGCM(hashlib.sha256(b"memory-gateway keys v1\0" + secret.encode()).digest())

    def seal(self, key_id: str, plaintext: str) -> bytes:
        nonce = os.urandom(12)
        return nonce + self._aead.encrypt(nonce, plaintext.encode(), key_id.encode())

    def open(self, key_id: str, blob: bytes) -> str:
        return self._aead.decrypt(blob[:12], blob[12:], key_id.encode()).decode()


class _SQLiteTable:
    """The keys of one data directory. Blocking: called in threads, one at a time."""

    errors: tuple[type[Exception], ...] = (sqlite3.Error, OSError)

    def __init__(self, path: Path) -> None:
        self.path = path
        self._db: sqlite3.Connection | None = None

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA busy_timeout=5000")
            db.execute(_SCHEMA)
            with contextlib.suppress(OSError):
                os.chmod(self.path, 0o600)
            self._db = db
        return self._db

    def version(self) -> object | None:
        """Moves when another connection commits (not for this one's own
        writes); None while no key was ever issued here."""
        if self._db is None and not self.path.exists():
            return None
        return self._conn().execute("PRAGMA data_version").fetchone()[0]

    def rows(self) -> list[Row]:
        sql = "SELECT id, user_id, name, digest, hint, upstream_key, created_at, expires_at"
        return self._conn().execute(sql + " FROM keys").fetchall()

    def insert(self, row: Row) -> None:
        self._conn().execute("INSERT INTO keys VALUES (?, ?, ?, ?, ?, ?, ?, ?)", row)

    def delete(self, key_id: str) -> bool:
        return self._conn().execute("DELETE FROM keys WHERE id = ?", (key_id,)).rowcount > 0

    def close(self) -> None:
        if self._db is not None:
            db, self._db = self._db, None
            db.close()


class _PostgresTable:
    """The keys every replica shares, beside the extraction queue. A dropped
    connection (the server restarted) is replaced at the next call."""

    def __init__(self, url: str) -> None:
        import psycopg

        from memory.spool_postgres import Target

        self._psycopg = psycopg
        self.errors: tuple[type[Exception], ...] = (psycopg.Error, OSError)
        self._target = Target(url)
        self._db: psycopg.Connection[Any] | None = None

    def _conn(self) -> Any:
        if self._db is not None and self._db.closed:
            self._db = None
        if self._db is None:
            db = self._target.connect_blocking(
                schema=_PG_SCHEMA, schema_lock=_PG_SCHEMA_LOCK, timeout=CONNECT_TIMEOUT_SECONDS
            )
            self._db = db
        return self._db

    def _call(self, fn: Callable[[Any], T]) -> T:
        try:
            return fn(self._conn())
        except self._psycopg.OperationalError:
            # The connection may be dead: a fresh one next time.
            self.close()
            raise

    def version(self) -> object | None:
        return self._call(
            lambda db: db.execute("SELECT version FROM gateway_keys_version").fetchone()[0]
        )

    def rows(self) -> list[Row]:
        sql = (
            "SELECT id, user_id, name, digest, hint, upstream_key, created_at, expires_at"
            " FROM gateway_keys"
        )
        return self._call(lambda db: db.execute(sql).fetchall())

    def _change(self, db: Any, sql: str, params: tuple[Any, ...]) -> int:
        with db.transaction():
            count = int(db.execute(sql, params).rowcount)
            db.execute("UPDATE gateway_keys_version SET version = version + 1")
        return count

    def insert(self, row: Row) -> None:
        sql = "INSERT INTO gateway_keys VALUES (%s, %s, %s, %s, %s, %s, %s, %s)"
        self._call(lambda db: self._change(db, sql, row))

    def delete(self, key_id: str) -> bool:
        sql = "DELETE FROM gateway_keys WHERE id = %s"
        return self._call(lambda db: self._change(db, sql, (key_id,))) > 0

    def close(self) -> None:
        if self._db is not None:
            db, self._db = self._db, None
            with contextlib.suppress(Exception):
                db.close()


class KeyStore:
    """The issued keys: of one data directory, or of every replica sharing
    a PostgreSQL `queue_url`."""

    def __init__(
        self, data_dir: Path, secret: str | None = None, *, queue_url: str | None = None
    ) -> None:
        self.path = data_dir / FILE
        self._table: _SQLiteTable | _PostgresTable = (
            _PostgresTable(queue_url)
            if queue_url is not None and queue_url.startswith(("postgresql://", "postgres://"))
            else _SQLiteTable(self.path)
        )
        self._cipher = _Cipher(secret) if secret else None
        # Database calls come from worker threads, one at a time.
        self._lock = threading.Lock()
        self._active: dict[bytes, _Active] = {}
        self._version: object | None = None
        self._task: asyncio.Task[None] | None = None

    # -- lifecycle ------------------------------------------------------------

    async def start(self) -> None:
        """Load the keys, then follow other processes' changes. A store that
        cannot be read (a read-only data directory, a queue server that is
        down) leaves only gateway.yaml's keys working, and is tried again; it
        never stops the gateway."""
        try:
            await asyncio.to_thread(self._reload, True)
        except self._table.errors as exc:
            logger.error("issued keys cannot be read (%s): only gateway.yaml's keys work", exc)
        self._task = asyncio.create_task(self._follow(), name="key-store")

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await asyncio.to_thread(self._closed)

    def _closed(self) -> None:
        with self._lock:
            self._table.close()

    async def _follow(self) -> None:
        # Said once when re-reading starts failing and once when it works
        # again, not twice a second while the database is away.
        failing = False
        while True:
            await asyncio.sleep(REFRESH_SECONDS)
            try:
                await asyncio.to_thread(self._reload, False)
            except self._table.errors as exc:
                if not failing:
                    logger.warning(
                        "could not re-read the issued keys (the keys known before still"
                        " work; trying again): %s",
                        exc,
                    )
                failing = True
            else:
                if failing:
                    logger.warning("the issued keys can be read again")
                failing = False

    def _reload(self, force: bool) -> None:
        """Re-read the keys if the table's version moved (`force` after this
        process's own writes, which SQLite's version does not count)."""
        with self._lock:
            version = self._table.version()
            if version is None or (version == self._version and not force):
                return
            rows = self._table.rows()
            self._version = version
        self._active = {
            bytes(r[3]): _Active(
                IssuedKey(r[0], r[1], r[2], r[4], r[5] is not None, r[6], r[7]),
                None if r[5] is None else bytes(r[5]),
            )
            for r in rows
        }

    # -- matching (on the event loop: memory only) -----------------------------

    def match(self, token: str) -> UserKey | None:
        """The active key `token` is, as the `UserKey` the gateway uses."""
        if not token.startswith(PREFIX):
            return None
        found = self._active.get(digest(token))
        if found is None:
            return None
        expires = found.key.expires_at
        if expires is not None and expires <= time.time():
            return None
        upstream = None
        if found.upstream_key is not None:
            upstream = self._upstream_key(found)
            if upstream is None:
                return None
        return UserKey(key=token, user_id=found.key.user_id, upstream_api_key=upstream)

    def _upstream_key(self, found: _Active) -> str | None:
        if self._cipher is None or found.upstream_key is None:
            logger.error(
                "key %s carries an upstream key but auth.keys_secret is not set: refused",
                found.key.id,
            )
            return None
        try:
            return self._cipher.open(found.key.id, found.upstream_key)
        except InvalidTag:
            logger.error(
                "the upstream key of key %s does not open with auth.keys_secret"
                " (was the secret changed?): refused",
                found.key.id,
            )
            return None

    # -- management (threads) ------------------------------------------------

    async def create(
        self,
        user_id: str,
        *,
        name: str | None = None,
        upstream_api_key: str | None = None,
        expires_at: float | None = None,
    ) -> tuple[IssuedKey, str]:
        """A new key for `user_id`: its listing and the key, shown this once."""
        if upstream_api_key and self._cipher is None:
            raise KeySecretMissing(
                "upstream_api_key needs auth.keys_secret (e.g. ${GATEWAY_KEYS_SECRET}) to be"
                " stored encrypted; without it, give the user's upstream key in gateway.yaml"
            )
        token = PREFIX + base64.urlsafe_b64encode(secrets.token_bytes(32)).decode().rstrip("=")
        key_id = "key_" + secrets.token_hex(8)
        sealed = (
            self._cipher.seal(key_id, upstream_api_key)
            if upstream_api_key and self._cipher is not None
            else None
        )
        issued = IssuedKey(
            key_id, user_id, name, token[-4:], sealed is not None, time.time(), expires_at
        )

        row: Row = (
            issued.id,
            user_id,
            name,
            digest(token),
            issued.hint,
            sealed,
            issued.created_at,
            expires_at,
        )

        def insert() -> None:
            with self._lock:
                self._table.insert(row)

        await asyncio.to_thread(insert)
        await asyncio.to_thread(self._reload, True)
        return issued, token

    async def list(self, user_id: str | None = None) -> list[IssuedKey]:
        await asyncio.to_thread(self._reload, False)
        keys = [a.key for a in self._active.values()]
        if user_id is not None:
            keys = [k for k in keys if k.user_id == user_id]
        return sorted(keys, key=lambda k: (k.created_at, k.id))

    async def revoke(self, key_id: str) -> bool:
        def delete() -> bool:
            with self._lock:
                return self._table.delete(key_id)

        deleted = await asyncio.to_thread(delete)
        await asyncio.to_thread(self._reload, True)
        return deleted
