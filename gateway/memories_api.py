"""`/v1/memories`: inspect and manage what the gateway remembers.

Who may call it: the admin key (`auth.admin_key`) may manage any user; a
per-user gateway key only its own user; with no admin key configured, loopback
clients act as admin. Every call is scoped to one user, so another user's
memory id answers 404, exactly like a missing one.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
import sqlite3
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import msgspec
from litestar import Controller, Request, Response, delete, get, post, put
from litestar.di import NamedDependency, Provide
from litestar.params import FromPath, FromQuery, JSONBody, QueryParameter
from litestar.response import Stream

from gateway.errors import GatewayError, error_response
from gateway.identity import KeyRing, bearer_token
from gateway.memory_hooks import MemoryHooks
from memory.engine import InvalidImport, MemoryEngine
from memory.models import (
    HistoryEntry,
    ImportResult,
    InvalidScope,
    Memory,
    Operation,
    Scope,
    Stats,
)
from memory.spool import JobInfo


@dataclass(slots=True, frozen=True)
class Principal:
    # None: an administrator, who may name any user.
    user_id: str | None


logger = logging.getLogger("gateway.memories")
# How long `POST /v1/memories?wait=true` waits for its extraction job.
WAIT_SECONDS = 30.0


class AddRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    user_id: str | None = None
    agent_id: str | None = None
    session_id: str | None = None
    text: str | None = None
    messages: list[dict[str, Any]] | None = None
    # True: extract facts through the LLM (queued); False: store the text as given.
    infer: bool = True
    metadata: dict[str, Any] | None = None
    # With infer=True, wait up to this many seconds for the extraction to finish.
    wait_seconds: float = 0.0


class SearchRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    query: str
    user_id: str | None = None
    agent_id: str | None = None
    limit: int | None = None
    include_superseded: bool = False


class UpdateRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    text: str | None = None
    metadata: dict[str, Any] | None = None


class SearchResult(msgspec.Struct, kw_only=True):
    memory: Memory
    score: float
    similarity: float


class AddResponse(msgspec.Struct, kw_only=True):
    results: list[Memory]
    job_id: str | None = None
    # For queued additions: pending, running, done or failed.
    job_state: str | None = None
    # Why a queued addition waits or failed (e.g. `no_key`: no key may be
    # sent to the extraction endpoint for this user yet; see docs/memory.md).
    job_reason: str | None = None
    # With `?wait=true` (or `wait_seconds`), once the job is done: what it
    # changed (ADD/UPDATE/DELETE; empty when there was nothing to remember).
    operations: list[Operation] | None = None


class MemoryList(msgspec.Struct, kw_only=True):
    object: Literal["list"] = "list"
    data: list[Memory]


class SearchResponse(msgspec.Struct, kw_only=True):
    results: list[SearchResult]


class HistoryResponse(msgspec.Struct, kw_only=True):
    data: list[HistoryEntry]


class UserCount(msgspec.Struct, kw_only=True):
    user_id: str
    memories: int


class UsersResponse(msgspec.Struct, kw_only=True):
    data: list[UserCount]


class JobsResponse(msgspec.Struct, kw_only=True):
    data: list[JobInfo]


class Deleted(msgspec.Struct, kw_only=True):
    deleted: int


class Retried(msgspec.Struct, kw_only=True):
    retried: int


class Access:
    """Decides who a management request acts for."""

    def __init__(self, admin_key: str | None, keys: KeyRing) -> None:
        self._admin = hashlib.sha256(admin_key.encode()).digest() if admin_key else None
        self._keys = keys

    def principal(self, request: Request[Any, Any, Any]) -> Principal:
        token = bearer_token(request.headers.get("authorization"))
        if token is not None:
            digest = hashlib.sha256(token.encode()).digest()
            if self._admin is not None and hmac.compare_digest(self._admin, digest):
                return Principal(user_id=None)
            key = self._keys.match(token)
            if key is not None:
                return Principal(user_id=key.user_id)
        if self._admin is None and _is_loopback(request):
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
        if token is None:
            return None
        digest = hashlib.sha256(token.encode()).digest()
        if self._admin is not None and hmac.compare_digest(self._admin, digest):
            return None
        return None if self._keys.match(token) is not None else token


def _is_loopback(request: Request[Any, Any, Any]) -> bool:
    client = request.client
    if client is None:
        return False
    try:
        return ipaddress.ip_address(client.host).is_loopback
    except ValueError:
        return False


def _scope(principal: Caller, user_id: str | None, agent_id: str | None = None) -> Scope:
    if principal.user_id is not None:
        if user_id is not None and user_id != principal.user_id:
            raise GatewayError(
                403, "this key may only manage its own user's memories", param="user_id"
            )
        user_id = principal.user_id
    if user_id is None:
        raise GatewayError(400, "user_id is required", param="user_id", code="missing_user_id")
    try:
        return Scope(user_id=user_id, agent_id=agent_id)
    except InvalidScope as exc:
        raise GatewayError(400, str(exc), param="user_id", code="invalid_id") from None


def _admin_only(principal: Caller) -> None:
    if principal.user_id is not None:
        raise GatewayError(403, "only the admin key may list users or manage the spool")


def _not_found(memory_id: str) -> GatewayError:
    return GatewayError(404, f"no memory {memory_id!r}", param="memory_id", code="not_found")


async def provide_engine(request: Request[Any, Any, Any]) -> MemoryEngine:
    hooks = request.app.state.hooks
    if not isinstance(hooks, MemoryHooks):
        raise GatewayError(404, "memory is disabled in this gateway", code="memory_disabled")
    if hooks.opened is None:
        raise GatewayError(
            503,
            "memory is not available yet: its store or embedder could not be opened "
            "(the gateway keeps trying; see its log)",
            code="memory_unavailable",
        )
    return hooks.opened


async def provide_principal(request: Request[Any, Any, Any]) -> Principal:
    access: Access = request.app.state.memory_access
    return access.principal(request)


UserId = Annotated[str | None, QueryParameter(description="whose memories")]
AgentId = Annotated[str | None, QueryParameter(description="narrow to one agent")]
Engine = NamedDependency[MemoryEngine]
Caller = NamedDependency[Principal]


def _storage_error(request: Request[Any, Any, Any], exc: Exception) -> Response[bytes]:
    """The data directory refused a read or write (read-only, full, I/O
    error): a 503 that says so, not a bare 500; the process stays up."""
    data_dir = request.app.state.config.data_path
    logger.error("memory storage in %s failed: %s: %s", data_dir, type(exc).__name__, exc)
    return error_response(
        GatewayError(
            503,
            f"memory storage is unavailable: the data directory {str(data_dir)!r} refused"
            f" the operation ({exc}); check that it is writable and has free space",
            code="storage_unavailable",
        )
    )


class MemoriesController(Controller):
    path = "/v1/memories"
    tags = ["memories"]
    dependencies = {
        "engine": Provide(provide_engine),
        "principal": Provide(provide_principal),
    }
    exception_handlers = {OSError: _storage_error, sqlite3.Error: _storage_error}

    @post("/", status_code=201, summary="Add memories (verbatim or through extraction)")
    async def add(
        self,
        request: Request[Any, Any, Any],
        engine: Engine,
        principal: Caller,
        data: JSONBody[AddRequest],
        wait: Annotated[
            bool,
            QueryParameter(description=f"infer: wait up to {WAIT_SECONDS:.0f} s for the job"),
        ] = False,
    ) -> AddResponse:
        scope = _scope(principal, data.user_id, data.agent_id)
        if data.session_id is not None:
            scope = Scope(
                user_id=scope.user_id, agent_id=scope.agent_id, session_id=data.session_id
            )
        try:
            result = await engine.add(
                scope,
                text=data.text,
                messages=data.messages,
                infer=data.infer,
                metadata=data.metadata,
                api_key=request.app.state.memory_access.lent_key(request),
            )
        except (ValueError, InvalidScope) as exc:
            raise GatewayError(400, str(exc), code="invalid_memory") from None
        if result.job_id is None:
            return AddResponse(results=result.memories)
        seconds = max(data.wait_seconds, WAIT_SECONDS if wait else 0.0)
        if seconds > 0:
            info = await engine.wait(result.job_id, timeout=min(seconds, 120.0))
        else:
            info = await engine.job(result.job_id)
        if info is None:
            # Erased meanwhile (its user was forgotten).
            return AddResponse(results=[], job_id=result.job_id, job_state="unknown")
        operations = None
        if seconds > 0 and info.state == "done":
            operations = await engine.job_operations(result.job_id)
        return AddResponse(
            results=[],
            job_id=result.job_id,
            job_state=info.state,
            job_reason=info.reason,
            operations=operations,
        )

    @get("/", summary="List a user's memories")
    async def list_memories(
        self,
        engine: Engine,
        principal: Caller,
        user_id: UserId = None,
        agent_id: AgentId = None,
        limit: Annotated[int, QueryParameter(ge=1, le=1000)] = 100,
        offset: Annotated[int, QueryParameter(ge=0)] = 0,
        include_superseded: FromQuery[bool] = False,
    ) -> MemoryList:
        scope = _scope(principal, user_id, agent_id)
        memories = await engine.list(
            scope, limit=limit, offset=offset, include_superseded=include_superseded
        )
        return MemoryList(data=memories)

    @delete("/", status_code=200, summary="Erase a user: memories, history and pending jobs")
    async def erase_user(
        self,
        engine: Engine,
        principal: Caller,
        user_id: UserId = None,
        agent_id: AgentId = None,
    ) -> Deleted:
        scope = _scope(principal, user_id, agent_id)
        return Deleted(deleted=await engine.delete_all(scope))

    @post("/search", status_code=200, summary="Search a user's memories")
    async def search(
        self, engine: Engine, principal: Caller, data: JSONBody[SearchRequest]
    ) -> SearchResponse:
        scope = _scope(principal, data.user_id, data.agent_id)
        if data.limit is not None and not 1 <= data.limit <= 100:
            raise GatewayError(400, "limit must be between 1 and 100", param="limit")
        hits = await engine.search(
            scope, data.query, limit=data.limit, include_superseded=data.include_superseded
        )
        return SearchResponse(
            results=[
                SearchResult(memory=h.memory, score=h.score, similarity=h.similarity) for h in hits
            ]
        )

    @get(
        "/export",
        summary="Export a user's memories as JSON lines",
        media_type="application/x-ndjson",
    )
    async def export(
        self,
        engine: Engine,
        principal: Caller,
        user_id: UserId = None,
        agent_id: AgentId = None,
    ) -> Stream:
        scope = _scope(principal, user_id, agent_id)
        lines = await engine.export(scope)

        async def body() -> AsyncIterator[bytes]:
            for line in lines:
                yield line.encode() + b"\n"

        return Stream(body(), media_type="application/x-ndjson")

    @post("/import", status_code=200, summary="Import JSON lines made by export")
    async def import_memories(
        self,
        request: Request[Any, Any, Any],
        engine: Engine,
        principal: Caller,
        user_id: UserId = None,
        agent_id: AgentId = None,
    ) -> ImportResult:
        scope = _scope(principal, user_id, agent_id)
        raw = await request.body()
        lines = [line for line in raw.splitlines() if line.strip()]
        try:
            result = await engine.import_lines(scope, lines)
        except InvalidImport as exc:
            raise GatewayError(400, str(exc), code="invalid_import") from None
        return result

    @get("/users", summary="Users with their memory counts (admin)")
    async def users(self, engine: Engine, principal: Caller) -> UsersResponse:
        _admin_only(principal)
        pairs = await engine.users()
        return UsersResponse(data=[UserCount(user_id=u, memories=n) for u, n in pairs])

    @get("/stats", summary="Memory and spool counts (admin)")
    async def stats(self, engine: Engine, principal: Caller) -> Stats:
        _admin_only(principal)
        return await engine.stats()

    @get("/jobs", summary="Extraction jobs in the spool (admin)")
    async def jobs(
        self,
        engine: Engine,
        principal: Caller,
        job_state: Annotated[
            Literal["pending", "running", "done", "failed"] | None, QueryParameter(name="state")
        ] = None,
        user_id: UserId = None,
        limit: Annotated[int, QueryParameter(ge=1, le=1000)] = 100,
    ) -> JobsResponse:
        _admin_only(principal)
        return JobsResponse(data=await engine.jobs(state=job_state, user_id=user_id, limit=limit))

    @get("/jobs/{job_id:str}", summary="One extraction job (admin, or its user's key)")
    async def job(self, engine: Engine, principal: Caller, job_id: FromPath[str]) -> JobInfo:
        info = await engine.job(job_id)
        if info is None or (principal.user_id is not None and info.user_id != principal.user_id):
            raise GatewayError(404, f"no job {job_id!r}", param="job_id", code="not_found")
        return info

    @post("/jobs/retry", status_code=200, summary="Retry failed extraction jobs (admin)")
    async def retry(self, engine: Engine, principal: Caller, user_id: UserId = None) -> Retried:
        _admin_only(principal)
        return Retried(retried=await engine.retry_failed(user_id))

    @get("/{memory_id:str}", summary="Get one memory")
    async def get_memory(
        self,
        engine: Engine,
        principal: Caller,
        memory_id: FromPath[str],
        user_id: UserId = None,
        agent_id: AgentId = None,
    ) -> Memory:
        memory = await engine.get(_scope(principal, user_id, agent_id), memory_id)
        if memory is None:
            raise _not_found(memory_id)
        return memory

    @put("/{memory_id:str}", summary="Correct a memory's text or metadata")
    async def update(
        self,
        engine: Engine,
        principal: Caller,
        memory_id: FromPath[str],
        data: JSONBody[UpdateRequest],
        user_id: UserId = None,
        agent_id: AgentId = None,
    ) -> Memory:
        if data.text is None and data.metadata is None:
            raise GatewayError(400, "give text or metadata to update", param="text")
        if data.text is not None and not data.text.strip():
            raise GatewayError(400, "text must not be empty", param="text")
        memory = await engine.update(
            _scope(principal, user_id, agent_id),
            memory_id,
            text=data.text,
            metadata=data.metadata,
        )
        if memory is None:
            raise _not_found(memory_id)
        return memory

    @delete("/{memory_id:str}", status_code=200, summary="Delete one memory")
    async def delete_memory(
        self,
        engine: Engine,
        principal: Caller,
        memory_id: FromPath[str],
        user_id: UserId = None,
        agent_id: AgentId = None,
    ) -> Deleted:
        if not await engine.delete(_scope(principal, user_id, agent_id), memory_id):
            raise _not_found(memory_id)
        return Deleted(deleted=1)

    @get("/{memory_id:str}/history", summary="A memory's ADD/UPDATE/DELETE history")
    async def history(
        self,
        engine: Engine,
        principal: Caller,
        memory_id: FromPath[str],
        user_id: UserId = None,
        agent_id: AgentId = None,
    ) -> HistoryResponse:
        entries = await engine.history(_scope(principal, user_id, agent_id), memory_id)
        if not entries:
            raise _not_found(memory_id)
        return HistoryResponse(data=entries)
