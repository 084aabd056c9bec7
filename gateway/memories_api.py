"""`/v1/memories`: inspect and manage what the gateway remembers.

Who may call it is decided in gateway/memories_access.py (the admin key any
user, a per-user gateway key only its own); the bodies are in
gateway/memories_schemas.py. Every call is scoped to one user, so another
user's memory id answers 404, exactly like a missing one.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import AsyncIterator
from typing import Annotated, Any, Literal

from litestar import Controller, Request, Response, delete, get, post, put
from litestar.di import NamedDependency, Provide
from litestar.params import FromPath, FromQuery, JSONBody, QueryParameter
from litestar.response import Stream

from gateway.errors import GatewayError, error_response
from gateway.memories_access import Principal, admin_only, provide_principal, scope_of
from gateway.memories_schemas import (
    AddRequest,
    AddResponse,
    Deleted,
    HistoryResponse,
    JobsResponse,
    MemoryList,
    Retried,
    SearchRequest,
    SearchResponse,
    SearchResult,
    UpdateRequest,
    UserCount,
    UsersResponse,
)
from gateway.memory_hooks import MemoryHooks
from memory.clipping import search_query
from memory.engine import MemoryEngine
from memory.errors import InvalidImport
from memory.models import ImportResult, InvalidScope, Memory, Scope, Stats
from memory.spool import JobInfo

logger = logging.getLogger("gateway.memories")
# How long `POST /v1/memories?wait=true` waits for its extraction job.
WAIT_SECONDS = 30.0


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
        scope = scope_of(principal, data.user_id, data.agent_id)
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
        scope = scope_of(principal, user_id, agent_id)
        memories = await engine.store.list(
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
        scope = scope_of(principal, user_id, agent_id)
        return Deleted(deleted=await engine.delete_all(scope))

    @post("/search", status_code=200, summary="Search a user's memories")
    async def search(
        self, engine: Engine, principal: Caller, data: JSONBody[SearchRequest]
    ) -> SearchResponse:
        scope = scope_of(principal, data.user_id, data.agent_id)
        if data.limit is not None and not 1 <= data.limit <= 100:
            raise GatewayError(400, "limit must be between 1 and 100", param="limit")
        hits = await engine.store.search(
            scope,
            search_query(data.query),
            limit=data.limit,
            include_superseded=data.include_superseded,
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
        scope = scope_of(principal, user_id, agent_id)
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
        scope = scope_of(principal, user_id, agent_id)
        lines = (await request.body()).splitlines()
        try:
            # Only an administrator's import keeps ids: whether an id is free
            # would tell a per-user key about other users' memories.
            result = await engine.import_lines(scope, lines, keep_ids=principal.user_id is None)
        except InvalidImport as exc:
            raise GatewayError(400, str(exc), code="invalid_import") from None
        return result

    @get("/users", summary="Users with their memory counts (admin)")
    async def users(self, engine: Engine, principal: Caller) -> UsersResponse:
        admin_only(principal)
        pairs = await engine.store.users()
        return UsersResponse(data=[UserCount(user_id=u, memories=n) for u, n in pairs])

    @get("/stats", summary="Memory and spool counts (admin)")
    async def stats(self, engine: Engine, principal: Caller) -> Stats:
        admin_only(principal)
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
        admin_only(principal)
        return JobsResponse(data=await engine.jobs(state=job_state, user_id=user_id, limit=limit))

    @get("/jobs/{job_id:str}", summary="One extraction job (admin, or its user's key)")
    async def job(self, engine: Engine, principal: Caller, job_id: FromPath[str]) -> JobInfo:
        info = await engine.job(job_id)
        if info is None or (principal.user_id is not None and info.user_id != principal.user_id):
            raise GatewayError(404, f"no job {job_id!r}", param="job_id", code="not_found")
        return info

    @post("/jobs/retry", status_code=200, summary="Retry failed extraction jobs (admin)")
    async def retry(self, engine: Engine, principal: Caller, user_id: UserId = None) -> Retried:
        admin_only(principal)
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
        memory = await engine.store.get(scope_of(principal, user_id, agent_id), memory_id)
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
            scope_of(principal, user_id, agent_id),
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
        if not await engine.store.delete(scope_of(principal, user_id, agent_id), memory_id):
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
        entries = await engine.store.history(scope_of(principal, user_id, agent_id), memory_id)
        if not entries:
            raise _not_found(memory_id)
        return HistoryResponse(data=entries)
