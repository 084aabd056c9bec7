"""The mem0 Platform API at `/mem0`, so mem0's own `MemoryClient` works unchanged.

`MemoryClient(api_key=<gateway key>, host="http://gateway:8080/mem0")` (PyPI
`mem0ai` 2.x, and the cheap 1.x paths) talks to the same engine and store as
our REST API and MCP. It is a thin adapter: mem0's paths, bodies and answers
on the outside, the gateway's rules on the inside.

- Auth: `Authorization: Token <key>` (mem0's scheme; `Bearer` works too),
  decided by the same `Access` as the REST API: the admin key (or a local
  client when no admin key is set) may name any user; a per-user gateway key
  acts for its own user only, and naming another is a 403.
- Entities: `user_id` is our user, `agent_id` our agent, `run_id` our
  session (provenance: kept on the memory, filterable, never a boundary) and
  `app_id`, which has no equivalent, is kept in the memory's metadata.
- Calls that name only a memory id: a per-user key looks in its own user's
  memories (another user's id answers 404, like a missing one); the admin
  key first finds which user holds the id (`MemoryStore.owner`).
- Adds with inference go through the spool: the answer's `event_id` is the
  spool job, polled at `/v1/event/{id}/`.
- Errors are mem0-shaped (`{"detail": ..., "error": ...}`): the client shows
  `detail` in the exception it raises.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Mapping
from typing import Annotated, Any
from urllib.parse import urlencode

import msgspec
from litestar import Controller, Request, Response, Router, delete, get, post, put
from litestar.di import NamedDependency, Provide
from litestar.exceptions import ClientException, HTTPException, ValidationException
from litestar.params import FromPath, JSONBody, QueryParameter

from gateway.errors import GatewayError
from gateway.identity import scope_for
from gateway.mem0_filters import ENTITIES, Criteria, bound, entity_of, parse
from gateway.memories_access import Access, Principal
from gateway.memories_api import provide_engine
from memory.clipping import search_query
from memory.engine import MemoryEngine
from memory.models import HistoryEntry, InvalidScope, Memory, Scope
from memory.spool import JobInfo

logger = logging.getLogger("gateway.mem0")

PATH = "/mem0"
ORG_ID = "memory-gateway"
PROJECT_ID = "default"
# Search asks the store for this many times `top_k` when filters narrow the
# hits further than the store can (run_id, app_id, several agents, dates).
OVERFETCH = 5
MAX_TOP_K = 100
LIST_CHUNK = 1000
EVENT_STATUS = {"pending": "PENDING", "running": "RUNNING", "done": "SUCCEEDED", "failed": "FAILED"}
# Options mem0 offers that this gateway cannot honour: refused, not ignored.
UNSUPPORTED_OPTIONS = (
    "custom_categories",
    "custom_instructions",
    "agent_custom_instructions",
    "structured_data_schema",
    "timestamp",
    "categories",
)

Engine = NamedDependency[MemoryEngine]
Caller = NamedDependency[Principal]


# -- auth ---------------------------------------------------------------------


def as_bearer(headers: Mapping[str, str]) -> dict[str, str]:
    """The headers with mem0's `Token <key>` rewritten as `Bearer <key>`, the
    one scheme the gateway's key check reads."""
    found = {k.lower(): v for k, v in headers.items()}
    authorization = found.get("authorization", "")
    if authorization[:6].lower() == "token ":
        found["authorization"] = "Bearer " + authorization[6:].strip()
    return found


async def provide_mem0_principal(request: Request[Any, Any, Any]) -> Principal:
    access: Access = request.app.state.memory_access
    client = request.client
    return access.principal_of(as_bearer(request.headers), client.host if client else None)


# -- errors, in mem0's shape --------------------------------------------------


def mem0_error(status: int, message: str, code: str | None = None) -> Response[bytes]:
    body = {"detail": message, "error": message, "code": code}
    return Response(
        content=msgspec.json.encode(body), status_code=status, media_type="application/json"
    )


def _gateway_error(_: Request[Any, Any, Any], exc: GatewayError) -> Response[bytes]:
    return mem0_error(exc.status, exc.message, exc.code)


def _http_error(_: Request[Any, Any, Any], exc: HTTPException) -> Response[bytes]:
    message = exc.detail or "error"
    extra = exc.extra if isinstance(exc, ValidationException) else None
    if isinstance(extra, list) and extra and isinstance(extra[0], Mapping):
        first = extra[0]
        message = f"invalid {first.get('key') or 'request'}: {first.get('message')}"
    return mem0_error(exc.status_code, message)


def _storage_error(request: Request[Any, Any, Any], exc: Exception) -> Response[bytes]:
    """The data directory refused a read or write: a 503 that says so."""
    logger.error("memory storage failed: %s: %s", type(exc).__name__, exc)
    return mem0_error(
        503, f"memory storage is unavailable ({type(exc).__name__})", "storage_unavailable"
    )


def _unexpected(_: Request[Any, Any, Any], exc: Exception) -> Response[bytes]:
    logger.exception("unhandled error in the mem0 API", exc_info=exc)
    return mem0_error(500, "internal gateway error", "internal_error")


def _not_found() -> GatewayError:
    return GatewayError(404, "Memory not found!", code="not_found")


# -- translation ----------------------------------------------------------------


def memory_json(memory: Memory, score: float | None = None) -> dict[str, Any]:
    """A memory as mem0 returns one."""
    found: dict[str, Any] = {
        "id": memory.id,
        "memory": memory.text,
        "user_id": memory.user_id,
        "agent_id": memory.agent_id,
        "run_id": memory.session_id,
        "app_id": entity_of(memory, "app_id"),
        "metadata": memory.metadata or None,
        "categories": [],
        "created_at": memory.created_at.isoformat(),
        "updated_at": memory.updated_at.isoformat(),
        "expiration_date": None,
    }
    if score is not None:
        found["score"] = round(min(1.0, max(0.0, score)), 4)
    return found


def history_json(entry: HistoryEntry) -> dict[str, Any]:
    at = entry.at.isoformat()
    return {
        "id": entry.id,
        "memory_id": entry.memory_id,
        "input": [],
        "old_memory": entry.old_text,
        "new_memory": entry.new_text,
        "event": entry.event,
        "user_id": entry.user_id,
        "agent_id": None,
        "metadata": None,
        "created_at": at,
        "updated_at": at,
    }


def event_json(info: JobInfo, operations: list[dict[str, Any]] | None) -> dict[str, Any]:
    return {
        "id": info.id,
        "event_type": "ADD",
        "status": EVENT_STATUS.get(info.state, "PENDING"),
        "user_id": info.user_id,
        "results": operations or [],
        "error": info.last_error if info.state == "failed" else None,
        "reason": info.reason,
    }


def _refuse_unsupported(data: Mapping[str, Any]) -> None:
    given = [name for name in UNSUPPORTED_OPTIONS if data.get(name) not in (None, [], {}, "")]
    if data.get("expiration_date") is not None:
        given.append("expiration_date")
    if given:
        raise GatewayError(
            400, f"not supported by this gateway: {', '.join(given)}", param=given[0]
        )


def _string(data: Mapping[str, Any], name: str) -> str | None:
    value = data.get(name)
    if value is not None and not isinstance(value, str):
        raise GatewayError(400, f"{name} must be a string", param=name)
    return value


def _number(data: Mapping[str, Any], name: str, low: float, high: float) -> float | None:
    value = data.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        raise GatewayError(400, f"{name} must be a number from {low:g} to {high:g}", param=name)
    return float(value)


def criteria_of(data: Mapping[str, Any]) -> Criteria:
    """`filters`, ANDed with entity ids given at the top level (mem0's add
    takes them there, and 1.x clients send them everywhere)."""
    criteria = parse(data.get("filters"))
    for name in ENTITIES:
        if (value := _string(data, name)) is not None:
            criteria.restrict(name, frozenset({value}))
    return criteria


def scope_of(principal: Principal, criteria: Criteria) -> Scope:
    """The one user (narrowed to one agent when the filters pin it) a call acts in."""
    users = criteria.entities.get("user_id")
    if users is not None and len(users) != 1:
        raise GatewayError(400, "filters must name exactly one user_id (several are not supported)")
    user = criteria.only("user_id")
    if user is None and principal.user_id is None:
        raise GatewayError(
            400,
            'name the user: filters={"user_id": "..."} (every memory here belongs to a user)',
            param="user_id",
            code="missing_user_id",
        )
    return scope_for(user, criteria.only("agent_id"), key_user=principal.user_id)


def write_scope(principal: Principal, criteria: Criteria) -> Scope:
    """Where an add writes: one value per entity, no date bounds."""
    if criteria.dates or any(len(v) != 1 for v in criteria.entities.values()):
        raise GatewayError(400, "add takes one value per entity id, and no date filters")
    scope = scope_of(principal, criteria)
    try:
        return Scope(
            user_id=scope.user_id, agent_id=scope.agent_id, session_id=criteria.only("run_id")
        )
    except InvalidScope as exc:
        raise GatewayError(400, str(exc), param="run_id") from None


def _messages(value: Any) -> list[dict[str, Any]]:
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if isinstance(value, list) and value and all(isinstance(m, dict) for m in value):
        return value
    raise GatewayError(
        400, "messages must be a non-empty list of {role, content} objects", param="messages"
    )


def _metadata(data: Mapping[str, Any], app_id: str | None) -> dict[str, Any] | None:
    metadata = data.get("metadata")
    if metadata is not None and not isinstance(metadata, dict):
        raise GatewayError(400, "metadata must be an object", param="metadata")
    if app_id is not None:
        metadata = {**(metadata or {}), "app_id": app_id}
    return metadata


def _page_url(request: Request[Any, Any, Any], page: int, size: int) -> str:
    query = urlencode({"page": page, "page_size": size})
    return str(request.url.with_replacements(query=query))


async def all_of(engine: MemoryEngine, scope: Scope, criteria: Criteria) -> list[Memory]:
    """Every active memory of `scope` the criteria allow, oldest first. One
    user's memories: read whole, so counts and pages agree with the filters."""
    found: list[Memory] = []
    offset = 0
    while True:
        chunk = await engine.store.list(scope, limit=LIST_CHUNK, offset=offset)
        found += [m for m in chunk if criteria.matches(m)]
        if len(chunk) < LIST_CHUNK:
            return found
        offset += LIST_CHUNK


async def owner_scope(engine: MemoryEngine, principal: Principal, memory_id: str) -> Scope:
    """Where an id-only call looks: a per-user key's own user, or (admin) the
    user holding the id; 404 when nobody does."""
    if "\x00" in memory_id:
        raise _not_found()
    if principal.user_id is not None:
        return Scope(user_id=principal.user_id)
    owner = await engine.store.owner(memory_id)
    if owner is None:
        raise _not_found()
    return Scope(user_id=owner)


async def _delete_matching(engine: MemoryEngine, scope: Scope, criteria: Criteria) -> int:
    """Delete what run_id/app_id select, which no store filter can express."""
    deleted = 0
    for memory in await all_of(engine, scope, criteria):
        deleted += await engine.store.delete(scope, memory.id)
    return deleted


# -- routes -------------------------------------------------------------------

Page = Annotated[int, QueryParameter(ge=1)]
PageSize = Annotated[int, QueryParameter(ge=1, le=LIST_CHUNK)]
EntityParam = Annotated[str | None, QueryParameter()]


class Mem0Controller(Controller):
    """mem0's paths (2.x first, 1.x aliases where cheap); trailing slashes match too."""

    dependencies = {"engine": Provide(provide_engine)}

    @get("/v1/ping", summary="Check the key (mem0 client construction)")
    async def ping(self, principal: Caller) -> dict[str, Any]:
        # The client refuses to start without both ids; one project per gateway.
        return {
            "status": "ok",
            "org_id": ORG_ID,
            "project_id": PROJECT_ID,
            "user_email": None,
            "user_id": principal.user_id,
        }

    @post(["/v3/memories/add", "/v1/memories"], status_code=200)
    async def add(
        self, engine: Engine, principal: Caller, data: JSONBody[dict[str, Any]]
    ) -> dict[str, Any]:
        """`infer` (the default) queues extraction and answers with its event;
        `infer: false` stores the user messages verbatim, synchronously."""
        _refuse_unsupported(data)
        criteria = criteria_of(data)
        scope = write_scope(principal, criteria)
        infer = data.get("infer", True)
        if not isinstance(infer, bool):
            raise GatewayError(400, "infer must be a boolean", param="infer")
        try:
            result = await engine.add(
                scope,
                messages=_messages(data.get("messages")),
                infer=infer,
                metadata=_metadata(data, criteria.only("app_id")),
            )
        except (ValueError, InvalidScope) as exc:
            raise GatewayError(400, str(exc), param="messages") from None
        if result.job_id is not None:
            return {
                "message": "Memory processing has been queued for background execution",
                "status": "PENDING",
                "event_id": result.job_id,
            }
        added = [{**memory_json(m), "event": "ADD"} for m in result.memories]
        return {"message": "Memories added", "results": added}

    @get("/v1/event/{event_id:str}", summary="An add's extraction job")
    async def event(
        self, engine: Engine, principal: Caller, event_id: FromPath[str]
    ) -> dict[str, Any]:
        info = await engine.job(event_id)
        if info is None or principal.user_id not in (None, info.user_id):
            raise GatewayError(404, "Event not found!", code="not_found")
        operations = None
        if info.state == "done":
            done = await engine.job_operations(event_id) or []
            operations = [
                {"id": o.memory_id, "event": o.op, "data": {"memory": o.text}}
                for o in done
                if o.op != "NONE"
            ]
        return event_json(info, operations)

    @post(["/v3/memories/search", "/v2/memories/search", "/v1/memories/search"], status_code=200)
    async def search(
        self, engine: Engine, principal: Caller, data: JSONBody[dict[str, Any]]
    ) -> dict[str, Any]:
        query = _string(data, "query")
        if not query or not query.strip():
            raise GatewayError(400, "query must be a non-empty string", param="query")
        _refuse_unsupported(data)
        criteria = criteria_of(data)
        scope = scope_of(principal, criteria)
        top_k = int(_number(data, "top_k", 1, MAX_TOP_K) or 10)
        threshold = _number(data, "threshold", -1, 1)
        hits = await engine.store.search(
            scope, search_query(query), limit=min(MAX_TOP_K, top_k * OVERFETCH), min_score=threshold
        )
        found = [memory_json(h.memory, h.score) for h in hits if criteria.matches(h.memory)]
        return {"results": found[:top_k]}

    @post(["/v3/memories", "/v2/memories"], status_code=200, summary="List (get_all)")
    async def get_all(
        self,
        request: Request[Any, Any, Any],
        engine: Engine,
        principal: Caller,
        data: JSONBody[dict[str, Any]],
        page: Page = 1,
        page_size: PageSize = 100,
    ) -> dict[str, Any]:
        _refuse_unsupported(data)
        criteria = criteria_of(data)
        for op, name in (("gte", "start_date"), ("lte", "end_date")):
            if data.get(name) is not None:
                criteria.dates.append(bound(op, data[name], name))
        memories = await all_of(engine, scope_of(principal, criteria), criteria)
        start = (page - 1) * page_size
        more = start + page_size < len(memories)
        return {
            "count": len(memories),
            "next": _page_url(request, page + 1, page_size) if more else None,
            "previous": _page_url(request, page - 1, page_size) if page > 1 else None,
            "results": [memory_json(m) for m in memories[start : start + page_size]],
        }

    @delete("/v1/memories", status_code=200, summary="Delete all of a user's memories")
    async def delete_all(
        self,
        engine: Engine,
        principal: Caller,
        user_id: EntityParam = None,
        agent_id: EntityParam = None,
        run_id: EntityParam = None,
        app_id: EntityParam = None,
    ) -> dict[str, Any]:
        given = {"user_id": user_id, "agent_id": agent_id, "run_id": run_id, "app_id": app_id}
        criteria = criteria_of(given)
        scope = scope_of(principal, criteria)
        if run_id is None and app_id is None:
            deleted = await engine.delete_all(scope)
        else:
            deleted = await _delete_matching(engine, scope, criteria)
        return {"message": "Memories deleted successfully!", "deleted": deleted}

    @get("/v1/memories/{memory_id:str}", summary="One memory, by id")
    async def get_memory(
        self, engine: Engine, principal: Caller, memory_id: FromPath[str]
    ) -> dict[str, Any]:
        memory = await engine.store.get(await owner_scope(engine, principal, memory_id), memory_id)
        if memory is None:
            raise _not_found()
        return memory_json(memory)

    @put("/v1/memories/{memory_id:str}", summary="Correct a memory's text or metadata")
    async def update(
        self,
        engine: Engine,
        principal: Caller,
        memory_id: FromPath[str],
        data: JSONBody[dict[str, Any]],
    ) -> dict[str, Any]:
        _refuse_unsupported(data)
        text, metadata = _string(data, "text"), _metadata(data, None)
        if text is None and metadata is None:
            raise GatewayError(400, "give text or metadata to update", param="text")
        scope = await owner_scope(engine, principal, memory_id)
        try:
            memory = await engine.update(scope, memory_id, text=text, metadata=metadata)
        except ValueError as exc:
            raise GatewayError(400, str(exc), param="text") from None
        if memory is None:
            raise _not_found()
        return memory_json(memory)

    @delete("/v1/memories/{memory_id:str}", status_code=200, summary="Delete one memory")
    async def delete_memory(
        self, engine: Engine, principal: Caller, memory_id: FromPath[str]
    ) -> dict[str, Any]:
        scope = await owner_scope(engine, principal, memory_id)
        if not await engine.store.delete(scope, memory_id):
            raise _not_found()
        return {"message": "Memory deleted successfully!"}

    @get("/v1/memories/{memory_id:str}/history", summary="A memory's history, as a list")
    async def history(
        self, engine: Engine, principal: Caller, memory_id: FromPath[str]
    ) -> list[dict[str, Any]]:
        scope = await owner_scope(engine, principal, memory_id)
        entries = await engine.store.history(scope, memory_id)
        if not entries:
            raise _not_found()
        return [history_json(e) for e in entries]

    @get("/v1/entities", summary="Users with memories (a per-user key: itself)")
    async def entities(self, engine: Engine, principal: Caller) -> dict[str, Any]:
        if principal.user_id is None:
            users = await engine.store.users()
        else:
            own = await engine.store.count(Scope(user_id=principal.user_id))
            users = [(principal.user_id, own)] if own else []
        results = [
            {"id": u, "name": u, "type": "user", "total_memories": n, "created_at": None}
            for u, n in users
        ]
        return {"count": len(results), "next": None, "previous": None, "results": results}

    @delete(
        [
            "/v2/entities/{entity_type:str}/{name:str}",
            "/v1/entities/{entity_type:str}/{name:str}",
        ],
        status_code=200,
        summary="Erase a user (or, for a per-user key, one of its agents)",
    )
    async def delete_entity(
        self, engine: Engine, principal: Caller, entity_type: FromPath[str], name: FromPath[str]
    ) -> dict[str, Any]:
        if entity_type == "user":
            scope = scope_for(name, key_user=principal.user_id)
        elif entity_type == "agent" and principal.user_id is not None:
            scope = scope_for(None, name, key_user=principal.user_id)
        elif entity_type == "agent":
            raise GatewayError(
                400,
                "agents belong to users here: delete with delete_all(user_id=..., agent_id=...)",
            )
        else:
            raise GatewayError(400, f"deleting {entity_type!r} entities is not supported")
        await engine.delete_all(scope)
        return {"message": "Entity deleted successfully."}


mem0_router = Router(
    path=PATH,
    route_handlers=[Mem0Controller],
    dependencies={"principal": Provide(provide_mem0_principal)},
    exception_handlers={
        GatewayError: _gateway_error,
        ClientException: _http_error,
        HTTPException: _http_error,
        OSError: _storage_error,
        sqlite3.Error: _storage_error,
        Exception: _unexpected,
    },
    # mem0 documents this API; the gateway's OpenAPI covers its own.
    include_in_schema=False,
    tags=["mem0"],
)
