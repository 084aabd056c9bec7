"""Per-user gateway keys issued at run time (`POST /v1/keys`), beside gateway.yaml's.

A key is shown once, when it is created; the store keeps its SHA-256 digest,
never the key. A key may carry the upstream key to use on its user's behalf:
that one must be sent upstream, so it cannot be hashed; it is stored only
encrypted (AES-GCM, with a key derived from `auth.keys_secret`, which lives
in the environment, never in the data directory), and refused without one.

The table is `<data_dir>/keys.sqlite3`, shared by every worker process. Each
process keeps the active keys in memory and re-reads them when another
connection committed a change (`PRAGMA data_version`), checked twice a
second by a background task: a key created or revoked on one worker works,
or stops working, on every worker within a second. Every SQLite call runs
in a thread, off the event loop.
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
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from gateway.config import UserKey

logger = logging.getLogger("gateway")

FILE = "keys.sqlite3"
# Every issued key starts so: a revoked or expired one is recognised (and
# refused) instead of being passed upstream as if it were the client's own.
PREFIX = "mgk-"
REFRESH_SECONDS = 0.5
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


class KeyStore:
    """The issued keys of one data directory."""

    def __init__(self, data_dir: Path, secret: str | None = None) -> None:
        self.path = data_dir / FILE
        self._cipher = _Cipher(secret) if secret else None
        self._db: sqlite3.Connection | None = None
        # SQLite calls come from worker threads, one at a time.
        self._lock = threading.Lock()
        self._active: dict[bytes, _Active] = {}
        self._version: int | None = None
        self._task: asyncio.Task[None] | None = None

    # -- lifecycle ------------------------------------------------------------

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

    async def start(self) -> None:
        """Load the keys, then follow other processes' changes. A store that
        cannot be read (a read-only data directory) leaves only gateway.yaml's
        keys working, and is tried again; it never stops the gateway."""
        try:
            await asyncio.to_thread(self._reload, True)
        except (sqlite3.Error, OSError) as exc:
            logger.error("issued keys cannot be read (%s): only gateway.yaml's keys work", exc)
        self._task = asyncio.create_task(self._follow(), name="key-store")

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._db is not None:
            db, self._db = self._db, None
            await asyncio.to_thread(db.close)

    async def _follow(self) -> None:
        while True:
            await asyncio.sleep(REFRESH_SECONDS)
            try:
                await asyncio.to_thread(self._reload, False)
            except (sqlite3.Error, OSError) as exc:
                logger.warning("could not re-read the issued keys: %s", exc)

    def _reload(self, force: bool) -> None:
        """Re-read the keys if another connection changed them (`data_version`
        does not move for this connection's own writes: `force` after those)."""
        with self._lock:
            if self._db is None and not self.path.exists():
                return  # no key was ever issued here: nothing to create yet
            db = self._conn()
            version = db.execute("PRAGMA data_version").fetchone()[0]
            if version == self._version and not force:
                return
            rows = db.execute(
                "SELECT id, user_id, name, digest, hint, upstream_key, created_at, expires_at"
                " FROM keys"
            ).fetchall()
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

        def insert() -> None:
            with self._lock:
                self._conn().execute(
                    "INSERT INTO keys VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        issued.id,
                        user_id,
                        name,
                        digest(token),
                        issued.hint,
                        sealed,
                        issued.created_at,
                        expires_at,
                    ),
                )

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
                return self._conn().execute("DELETE FROM keys WHERE id = ?", (key_id,)).rowcount > 0

        deleted = await asyncio.to_thread(delete)
        await asyncio.to_thread(self._reload, True)
        return deleted
