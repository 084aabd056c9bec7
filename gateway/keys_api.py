"""`/v1/keys`: issuing and revoking per-user gateway keys at run time (admin only).

A key is returned once, by the call that creates it; listings show its id,
user, name, last four characters and dates, never the key. Issued keys work
wherever gateway.yaml's do (chat, Responses, Messages, the memory APIs,
MCP) and are stored in gateway/key_store.py.
"""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime
from typing import Annotated, Any

import msgspec
from litestar import Controller, Request, Response, delete, get, post
from litestar.di import NamedDependency, Provide
from litestar.params import FromPath, JSONBody, QueryParameter

from gateway.errors import GatewayError, error_response
from gateway.key_store import IssuedKey, KeySecretMissing, KeyStore
from gateway.memories_access import Principal, admin_only, provide_principal
from memory.models import InvalidScope, validate_id

Caller = NamedDependency[Principal]
Store = NamedDependency[KeyStore]


class CreateKey(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    user_id: str
    name: str | None = None
    # Sent upstream on the user's behalf (stored encrypted: auth.keys_secret).
    upstream_api_key: str | None = None
    expires_at: datetime | None = None


class KeyInfo(msgspec.Struct, kw_only=True):
    id: str
    user_id: str
    name: str | None
    # The key's last four characters.
    hint: str
    has_upstream_key: bool
    created_at: datetime
    expires_at: datetime | None


class CreatedKey(KeyInfo, kw_only=True):
    # Shown this once: only its digest is kept.
    key: str


class KeyList(msgspec.Struct, kw_only=True):
    data: list[KeyInfo]


class Revoked(msgspec.Struct, kw_only=True):
    deleted: int


def _when(seconds: float | None) -> datetime | None:
    return None if seconds is None else datetime.fromtimestamp(seconds, UTC)


def _info(key: IssuedKey) -> dict[str, Any]:
    return {
        "id": key.id,
        "user_id": key.user_id,
        "name": key.name,
        "hint": key.hint,
        "has_upstream_key": key.has_upstream_key,
        "created_at": _when(key.created_at),
        "expires_at": _when(key.expires_at),
    }


async def provide_store(request: Request[Any, Any, Any]) -> KeyStore:
    store: KeyStore = request.app.state.issued_keys
    return store


def _storage_error(_: Request[Any, Any, Any], exc: Exception) -> Response[bytes]:
    error = GatewayError(
        503, f"the key store is unavailable ({type(exc).__name__})", code="storage_unavailable"
    )
    return error_response(error)


class KeysController(Controller):
    path = "/v1/keys"
    tags = ["keys"]
    dependencies = {"store": Provide(provide_store), "principal": Provide(provide_principal)}
    exception_handlers = {OSError: _storage_error, sqlite3.Error: _storage_error}

    @post("/", status_code=201, summary="Issue a key for a user (admin); shown once")
    async def create(
        self, store: Store, principal: Caller, data: JSONBody[CreateKey]
    ) -> CreatedKey:
        admin_only(principal)
        try:
            validate_id("user_id", data.user_id)
        except InvalidScope as exc:
            raise GatewayError(400, str(exc), param="user_id", code="invalid_id") from None
        expires = None
        if data.expires_at is not None:
            at = data.expires_at if data.expires_at.tzinfo else data.expires_at.replace(tzinfo=UTC)
            expires = at.timestamp()
            if expires <= datetime.now(UTC).timestamp():
                raise GatewayError(400, "expires_at is in the past", param="expires_at")
        try:
            issued, token = await store.create(
                data.user_id,
                name=data.name,
                upstream_api_key=data.upstream_api_key or None,
                expires_at=expires,
            )
        except KeySecretMissing as exc:
            raise GatewayError(
                400, str(exc), param="upstream_api_key", code="keys_secret_missing"
            ) from None
        return CreatedKey(key=token, **_info(issued))

    @get("/", summary="Issued keys, without the keys (admin)")
    async def list_keys(
        self,
        store: Store,
        principal: Caller,
        user_id: Annotated[str | None, QueryParameter(description="only this user's")] = None,
    ) -> KeyList:
        admin_only(principal)
        keys = await store.list(user_id)
        return KeyList(data=[KeyInfo(**_info(k)) for k in keys])

    @delete("/{key_id:str}", status_code=200, summary="Revoke a key (admin)")
    async def revoke(self, store: Store, principal: Caller, key_id: FromPath[str]) -> Revoked:
        admin_only(principal)
        if not await store.revoke(key_id):
            raise GatewayError(404, f"no key {key_id!r}", param="key_id", code="not_found")
        return Revoked(deleted=1)
