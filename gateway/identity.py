"""Who is asking: a per-user gateway key, a header, or the body's `user`.

The user id found here scopes every memory read and write, so invalid ids are
rejected with 400 rather than silently truncated, and keys are compared in
constant time (`KeyMatcher`, the one key check of the gateway). `scope_for` is
the one rule turning a request into a memory scope, for chat and for the
management API alike.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Generic, Literal, TypeVar

from gateway.config import AuthConfig, IdentityConfig, UserKey
from gateway.errors import GatewayError
from gateway.key_store import PREFIX as ISSUED_PREFIX
from gateway.key_store import KeyStore
from memory.models import InvalidScope, Scope, validate_id

Via = Literal["key", "header", "body"]
T = TypeVar("T")


@dataclass(slots=True)
class Identity:
    user_id: str | None = None
    agent_id: str | None = None
    session_id: str | None = None
    via: Via | None = None
    # The gateway key that named the user, when one did.
    key: UserKey | None = None

    def __repr__(self) -> str:
        # Keys must never reach a log line through a stray `%r`.
        return (
            f"Identity(user_id={self.user_id!r}, agent_id={self.agent_id!r}, "
            f"session_id={self.session_id!r}, via={self.via!r})"
        )


def bearer_token(authorization: str | None) -> str | None:
    if authorization and authorization[:7].lower() == "bearer ":
        return authorization[7:].strip() or None
    return None


class KeyMatcher(Generic[T]):
    """Secret keys, each standing for a value, matched by SHA-256 digest in
    constant time: the one key check of the gateway."""

    def __init__(self, keys: Iterable[tuple[str, T]]) -> None:
        self._keys = [(hashlib.sha256(key.encode()).digest(), value) for key, value in keys]

    def __bool__(self) -> bool:
        return bool(self._keys)

    def match(self, token: str | None) -> T | None:
        if token is None or not self._keys:
            return None
        digest = hashlib.sha256(token.encode()).digest()
        found = None
        # No early exit: the time taken does not depend on which key matched.
        for candidate, value in self._keys:
            if hmac.compare_digest(candidate, digest):
                found = value
        return found


class KeyRing(KeyMatcher[UserKey]):
    """The gateway-issued keys, each naming its user: gateway.yaml's, and
    those issued at run time (`issued`, gateway/key_store.py)."""

    def __init__(self, keys: list[UserKey], issued: KeyStore | None = None) -> None:
        super().__init__((k.key, k) for k in keys)
        self.issued = issued

    def match(self, token: str | None) -> UserKey | None:
        found = super().match(token)
        if found is None and token is not None and self.issued is not None:
            found = self.issued.match(token)
        return found


def scope_for(
    user_id: str | None,
    agent_id: str | None = None,
    session_id: str | None = None,
    *,
    key_user: str | None = None,
) -> Scope:
    """The memory scope a request acts in: its user, narrowed to its agent
    (and session). `key_user`: the user a per-user gateway key binds the
    request to, which naming another user cannot escape (403)."""
    if key_user is not None:
        if user_id is not None and user_id != key_user:
            raise GatewayError(
                403, "this key may only manage its own user's memories", param="user_id"
            )
        user_id = key_user
    if user_id is None:
        raise GatewayError(400, "user_id is required", param="user_id", code="missing_user_id")
    try:
        return Scope(user_id=user_id, agent_id=agent_id, session_id=session_id)
    except InvalidScope as exc:
        raise GatewayError(400, str(exc), param="user_id", code="invalid_id") from None


def _checked(kind: str, value: str | None) -> str | None:
    if value is None:
        return None
    try:
        return validate_id(kind, value)
    except InvalidScope as exc:
        raise GatewayError(
            400, f"invalid {kind}: {exc}", param=kind, code="invalid_id", retryable=False
        ) from None


def _json_type(value: object) -> str:
    """The JSON name of a decoded value's type, for error messages."""
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    return "an array" if isinstance(value, list) else "an object"


class IdentityResolver:
    def __init__(
        self, auth: AuthConfig, identity: IdentityConfig, issued: KeyStore | None = None
    ) -> None:
        self.require_key = auth.require_key
        self.keys = KeyRing(auth.keys, issued)
        self.user_headers = [name.lower() for name in identity.user_headers]
        # As configured, for messages that tell a caller which header to send.
        self.user_header_name = identity.user_headers[0]
        self.agent_header = identity.agent_header.lower()
        self.session_header = identity.session_header.lower()
        self.body_user_field = identity.body_user_field
        # Consumed by the gateway; the upstream provider has no business seeing them.
        self.consumed_headers = frozenset(
            {*self.user_headers, self.agent_header, self.session_header}
        )

    def from_headers(self, headers: Mapping[str, str]) -> Identity:
        """Resolve everything the headers say; 401 for an unknown key when keys are required."""
        # Anthropic clients send their key as `x-api-key` (Claude Code's
        # ANTHROPIC_API_KEY); OpenAI clients as a bearer token.
        token = bearer_token(headers.get("authorization")) or headers.get("x-api-key")
        key = self.keys.match(token)
        if key is None and token is not None and token.startswith(ISSUED_PREFIX):
            # One of ours, revoked or expired: never passed upstream as the client's own.
            raise GatewayError(
                401,
                "this gateway key is revoked or expired",
                code="invalid_api_key",
                retryable=False,
            )
        if key is None and self.require_key:
            raise GatewayError(
                401,
                "a valid gateway API key is required",
                code="invalid_api_key",
                retryable=False,
            )
        ident = Identity(
            agent_id=_checked("agent_id", headers.get(self.agent_header)),
            session_id=_checked("session_id", headers.get(self.session_header)),
            key=key,
        )
        if key is not None:
            ident.user_id, ident.via = key.user_id, "key"
        elif (user := self._header_user(headers)) is not None:
            ident.user_id, ident.via = user, "header"
        return ident

    def _header_user(self, headers: Mapping[str, str]) -> str | None:
        for name in self.user_headers:
            if (user := headers.get(name)) is not None:
                return _checked("user_id", user)
        return None

    def named_in_headers(self, headers: Mapping[str, str]) -> tuple[str | None, str | None]:
        """The user and agent the identity headers name (validated), whoever
        the caller is: for callers whose key does not name the user itself."""
        return self._header_user(headers), _checked("agent_id", headers.get(self.agent_header))

    def from_body(
        self, ident: Identity, body: Mapping[str, object], fields: tuple[str, ...] = ("user",)
    ) -> None:
        """Fall back to the body's user field (the first of `fields` present)
        when nothing else named the user.

        A value that is not a string is a 400: taken as "no user", the
        request would silently go without memory. JSON null means unset.
        """
        if ident.user_id is not None or not self.body_user_field:
            return
        for name in fields:
            user = body.get(name)
            if user is None:
                continue
            if not isinstance(user, str):
                raise GatewayError(
                    400,
                    f"Invalid type for '{name}': expected a string, got {_json_type(user)}.",
                    param=name,
                    code="invalid_type",
                    retryable=False,
                )
            ident.user_id, ident.via = _checked(name, user), "body"
            return
