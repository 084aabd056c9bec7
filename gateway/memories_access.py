"""Who a `/v1/memories` call acts for, and in which scope.

The admin key (`auth.admin_key`) may manage any user; a per-user gateway key
only its own user; with no admin key configured, loopback clients act as
admin. Keys are checked by the gateway's one key matcher and requests turned
into scopes by its one resolver (both in gateway/identity.py).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Any

from litestar import Request

from gateway.errors import GatewayError
from gateway.identity import KeyMatcher, KeyRing, bearer_token, scope_for
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
        token = bearer_token(request.headers.get("authorization"))
        if token is not None:
            if self._is_admin(token):
                return Principal(user_id=None)
            key = self._keys.match(token)
            if key is not None:
                return Principal(user_id=key.user_id)
        if self._admin is None and is_loopback(request):
            return Principal(user_id=None)
        raise GatewayError(
            401,
            "the memory API needs the admin key or a per-user gateway key"
            + ("" if self._admin is not None else " (or a loopback client)"),
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


def is_loopback(request: Request[Any, Any, Any]) -> bool:
    client = request.client
    if client is None:
        return False
    try:
        return ipaddress.ip_address(client.host).is_loopback
    except ValueError:
        return False


def scope_of(principal: Principal, user_id: str | None, agent_id: str | None = None) -> Scope:
    """The scope a call acts in: a per-user key's own user, or the user it names."""
    return scope_for(user_id, agent_id, key_user=principal.user_id)


def admin_only(principal: Principal) -> None:
    if principal.user_id is not None:
        raise GatewayError(403, "only the admin key may list users or manage the spool")


async def provide_principal(request: Request[Any, Any, Any]) -> Principal:
    access: Access = request.app.state.memory_access
    return access.principal(request)
