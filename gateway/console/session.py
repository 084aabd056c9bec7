"""Who is using the console: signed session cookies, CSRF tokens, foreign origins.

Access follows the management API's rule (gateway/memories_access.py): the
admin key may see every user, a per-user gateway key only its own, and with
no admin key a local client is admin without logging in. A browser cannot
send a bearer key by itself, so the login form takes the key once and gives
back a session cookie:

- **stateless and signed**: `v1.<payload>.<HMAC-SHA256>`, the payload holding
  the principal (a user id, or none for the admin), an expiry, a random
  nonce and a fingerprint of the key it was made from (an HMAC of the key,
  never the key). Any worker process verifies it: the signing secret is
  derived from configuration they all share (`auth.admin_key`, else
  `auth.keys_secret`, else gateway.yaml's per-user keys), and nothing is
  kept in memory or on disk. With none of them configured, only local
  clients (no login needed) can use the console.
- **bound to its key**: every request checks the key is still valid - the
  admin key's fingerprint against the configured one, a gateway.yaml key's
  against gateway.yaml's keys of that user, an issued key's id against the
  key store's active keys (gateway/key_store.py): a revoked or expired key
  ends its sessions on every worker within the store's refresh (half a
  second); a changed admin key ends every session.
- **the cookie**: HttpOnly, SameSite=Strict, Path=/ui, Secure over https.

CSRF: every POST form carries a token that is an HMAC of the session's nonce
(per session, never stored); without a session (the login form, a local
client) it is the value of a random double-submit cookie (`mg_console_csrf`,
also HttpOnly and SameSite=Strict). A POST whose `Origin` names another host,
or that the browser marks as cross-site or same-site (`Sec-Fetch-Site`), is
refused before its token is even read.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from litestar import Request

from gateway.config import AuthConfig
from gateway.errors import GatewayError
from gateway.key_store import PREFIX as ISSUED_PREFIX
from gateway.key_store import KeyStore
from gateway.memories_access import Access, Principal

SESSION_COOKIE = "mg_console"
CSRF_COOKIE = "mg_console_csrf"
COOKIE_PATH = "/ui"
CSRF_FIELD = "csrf_token"
# A session lasts a working day; an issued key that expires sooner ends it sooner.
SESSION_SECONDS = 8 * 3600
_VERSION = "v1"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def signing_secret(auth: AuthConfig) -> bytes | None:
    """The key sessions are signed with, derived from secrets every worker
    process shares through configuration; None when there is none."""
    if auth.admin_key:
        material = b"admin\0" + auth.admin_key.encode()
    elif auth.keys_secret:
        material = b"keys-secret\0" + auth.keys_secret.encode()
    elif auth.keys:
        material = b"user-keys\0" + b"\0".join(sorted(k.key.encode() for k in auth.keys))
    else:
        return None
    return hmac.new(b"memory-gateway console session v1", material, hashlib.sha256).digest()


class LoginRefused(Exception):
    """The login form's key is not one the console accepts (the message says why)."""


@dataclass(frozen=True, slots=True)
class Session:
    user_id: str | None  # None: the admin
    expires_at: int
    nonce: str
    fingerprint: str
    # The issued keys (gateway/key_store.py) the session stands on, by id.
    key_ids: tuple[str, ...] = ()

    @property
    def principal(self) -> Principal:
        return Principal(user_id=self.user_id)


class Sessions:
    """Makes and checks console sessions; one per app, stateless."""

    def __init__(self, auth: AuthConfig, access: Access, issued: KeyStore) -> None:
        self._auth = auth
        self._access = access
        self._issued = issued
        self._secret = signing_secret(auth)

    @property
    def can_log_in(self) -> bool:
        return self._secret is not None

    def _mac(self, label: bytes, data: bytes) -> bytes:
        assert self._secret is not None
        return hmac.new(self._secret, label + b"\0" + data, hashlib.sha256).digest()

    def _fingerprint(self, key: str) -> str:
        return self._mac(b"key", key.encode())[:16].hex()

    # -- login ----------------------------------------------------------------

    async def login(self, key: str) -> tuple[Session, str]:
        """A session for `key` and its cookie value; LoginRefused when the key
        is no admin or gateway key (the management API's own check)."""
        if self._secret is None:
            raise LoginRefused(
                "logging in needs auth.admin_key (or auth.keys_secret) to be configured;"
                " without one only local clients can use the console"
            )
        key = key.strip()
        try:
            principal = self._access.principal_of({"authorization": f"Bearer {key}"}, None)
        except GatewayError:
            raise LoginRefused("that key is neither the admin key nor a gateway key") from None
        expires = int(time.time()) + SESSION_SECONDS
        key_ids: tuple[str, ...] = ()
        if principal.user_id is not None and not self._configured_key(key):
            if not key.startswith(ISSUED_PREFIX):
                raise LoginRefused("that key is neither the admin key nor a gateway key")
            # The key itself is not kept: the ids of the user's active keys
            # ending like it (normally one) stand for it.
            issued = [k for k in await self._issued.list(principal.user_id) if k.hint == key[-4:]]
            if not issued:
                raise LoginRefused("this gateway key is revoked or expired")
            key_ids = tuple(sorted(k.id for k in issued))
            ends = [k.expires_at for k in issued if k.expires_at is not None]
            if ends:
                expires = min(expires, int(min(ends)))
        session = Session(
            user_id=principal.user_id,
            expires_at=expires,
            nonce=secrets.token_urlsafe(16),
            fingerprint=self._fingerprint(key),
            key_ids=key_ids,
        )
        return session, self.encode(session)

    def _configured_key(self, key: str) -> bool:
        return any(hmac.compare_digest(k.key.encode(), key.encode()) for k in self._auth.keys)

    # -- the cookie -----------------------------------------------------------

    def encode(self, session: Session) -> str:
        payload = json.dumps(
            {
                "u": session.user_id,
                "e": session.expires_at,
                "n": session.nonce,
                "f": session.fingerprint,
                "k": list(session.key_ids),
            },
            separators=(",", ":"),
        ).encode()
        body = f"{_VERSION}.{_b64(payload)}"
        return f"{body}.{_b64(self._mac(b'session', body.encode()))}"

    def _decode(self, value: str) -> Session | None:
        if self._secret is None:
            return None
        try:
            version, payload, mac = value.split(".")
            if version != _VERSION:
                return None
            body = f"{version}.{payload}"
            if not hmac.compare_digest(_unb64(mac), self._mac(b"session", body.encode())):
                return None
            data: Mapping[str, Any] = json.loads(_unb64(payload))
            session = Session(
                user_id=data["u"],
                expires_at=int(data["e"]),
                nonce=str(data["n"]),
                fingerprint=str(data["f"]),
                key_ids=tuple(str(k) for k in data["k"]),
            )
        except (ValueError, KeyError, TypeError):
            return None
        if session.user_id is not None and not isinstance(session.user_id, str):
            return None
        return session

    async def verify(self, value: str | None) -> Session | None:
        """The session a cookie holds, if it is genuine, unexpired, and its key
        still valid; None otherwise."""
        if not value:
            return None
        session = self._decode(value)
        if session is None or session.expires_at <= time.time():
            return None
        if session.user_id is None:
            admin = self._auth.admin_key
            valid = bool(admin) and hmac.compare_digest(
                session.fingerprint, self._fingerprint(admin or "")
            )
        elif session.key_ids:
            active = {
                k.id: k
                for k in await self._issued.list(session.user_id)
                if k.expires_at is None or k.expires_at > time.time()
            }
            valid = all(key_id in active for key_id in session.key_ids)
        else:
            valid = any(
                hmac.compare_digest(session.fingerprint, self._fingerprint(k.key))
                for k in self._auth.keys
                if k.user_id == session.user_id
            )
        return session if valid else None

    # -- CSRF -----------------------------------------------------------------

    def csrf_token(self, session: Session) -> str:
        return _b64(self._mac(b"csrf", session.nonce.encode()))


def new_csrf_cookie() -> str:
    return secrets.token_urlsafe(32)


def tokens_match(given: str | None, expected: str | None) -> bool:
    if not given or not expected:
        return False
    return hmac.compare_digest(given.encode(), expected.encode())


def foreign_origin(request: Request[Any, Any, Any]) -> bool:
    """Whether a state-changing request comes from another site: the browser
    says it is not same-origin (`Sec-Fetch-Site`), or its `Origin` names
    another host than the one it was sent to. Pages are served with
    `Referrer-Policy: no-referrer`, under which Chromium sends `Origin: null`
    even for a same-origin form: "null" passes only with `Sec-Fetch-Site:
    same-origin` (a sandboxed frame elsewhere sends "cross-site")."""
    fetch_site = request.headers.get("sec-fetch-site", "").lower()
    if fetch_site in ("cross-site", "same-site"):
        return True
    origin = request.headers.get("origin")
    if origin is None:
        return False
    if origin == "null":
        return fetch_site != "same-origin"
    host = request.headers.get("host", "")
    return urlsplit(origin).netloc.lower() != host.lower()


def is_https(request: Request[Any, Any, Any]) -> bool:
    return request.url.scheme == "https"
