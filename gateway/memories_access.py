"""Who a memory-management call (the REST API, MCP) acts for, and in which scope.

The admin key (`auth.admin_key`) may manage any user; a per-user gateway key
only its own user; with no admin key configured, a local client acts as
admin. Local means more than a loopback peer address: a browser page can
reach a loopback port under a foreign name (DNS rebinding) and a reverse
proxy on the same machine makes every client look local, so the request
must also address the gateway by a loopback name (`Host`), carry no foreign
`Origin`, and bear no proxy's forwarding headers. Keys are checked by the
gateway's one key matcher and requests turned into scopes by its one
resolver (both in gateway/identity.py).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from litestar import Request

from gateway.errors import GatewayError
from gateway.identity import KeyMatcher, KeyRing, bearer_token, scope_for
from gateway.key_store import PREFIX as ISSUED_PREFIX
from memory.models import Scope


@dataclass(slots=True, frozen=True)
class Principal:
    # None: an administrator, who may name any user.
    user_id: str | None


class Access:
    """Decides who a management request acts for."""

    def __init__(self, admin_key: str | None, keys: KeyRing) -> None:
        self._admin = KeyMatcher([(admin_key, True)]) if admin_key else None
        self._keys = keys

    def _is_admin(self, token: str) -> bool:
        return self._admin is not None and self._admin.match(token) is not None

    def principal(self, request: Request[Any, Any, Any]) -> Principal:
        client = request.client
        return self.principal_of(request.headers, client.host if client else None)

    def principal_of(self, headers: Mapping[str, str], client_host: str | None) -> Principal:
        """The caller, from its headers and peer address; 401 when it is nobody."""
        token = bearer_token(headers.get("authorization"))
        if token is not None:
            if self._is_admin(token):
                return Principal(user_id=None)
            key = self._keys.match(token)
            if key is not None:
                return Principal(user_id=key.user_id)
            if token.startswith(ISSUED_PREFIX):
                # A user's revoked or expired key does not fall back to local admin.
                raise GatewayError(
                    401,
                    "this gateway key is revoked or expired",
                    code="invalid_api_key",
                    retryable=False,
                )
        if self._admin is None and is_local(headers, client_host):
            return Principal(user_id=None)
        raise GatewayError(
            401,
            "the memory API needs the admin key or a per-user gateway key"
            + (
                ""
                if self._admin is not None
                else " (or a local client: a loopback connection addressing the gateway"
                " by a loopback name, with no foreign Origin and through no proxy)"
            ),
            code="invalid_api_key",
            retryable=False,
        )

    def lent_key(self, request: Request[Any, Any, Any]) -> str | None:
        """A bearer token that is neither the admin key nor a gateway key: the
        caller's own key, lent for the extraction this call asks for."""
        token = bearer_token(request.headers.get("authorization"))
        if token is None or self._is_admin(token):
            return None
        return None if self._keys.match(token) is not None else token


_LOOPBACK_NAMES = ("localhost", "127.0.0.1", "[::1]")
_FORWARDING = ("forwarded", "x-forwarded-for", "x-forwarded-host", "x-real-ip")


def _loopback_address(host: str | None) -> bool:
    if host is None:
        return False
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _loopback_name(authority: str) -> bool:
    """Whether `host[:port]` names this machine's loopback interface."""
    name = authority.rsplit(":", 1)[0] if not authority.endswith("]") else authority
    return name.lower() in _LOOPBACK_NAMES or _loopback_address(name.strip("[]"))


def is_local(headers: Mapping[str, str], client_host: str | None) -> bool:
    """A client on this machine talking to the gateway directly (see the module
    docstring for why the peer address alone is not enough)."""
    if not _loopback_address(client_host) or not _loopback_name(headers.get("host", "")):
        return False
    origin = headers.get("origin")
    if origin is not None and not _loopback_name(origin.split("://", 1)[-1]):
        return False
    return not any(name in headers for name in _FORWARDING)


def scope_of(principal: Principal, user_id: str | None, agent_id: str | None = None) -> Scope:
    """The scope a call acts in: a per-user key's own user, or the user it names."""
    return scope_for(user_id, agent_id, key_user=principal.user_id)


def admin_only(principal: Principal) -> None:
    if principal.user_id is not None:
        raise GatewayError(
            403,
            "only the admin key may do this (list users, manage the spool or keys);"
            " a per-user key manages its own user's memories",
        )


async def provide_principal(request: Request[Any, Any, Any]) -> Principal:
    access: Access = request.app.state.memory_access
    return access.principal(request)
