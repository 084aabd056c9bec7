"""Memory over MCP (`/mcp`): tools an agent calls to read and write its user's memories.

Claude Desktop, Cursor and any MCP client connect over streamable HTTP. The
server is stateless and answers with JSON, so each call is one POST that any
worker can serve, and the same store backs the chat injection, the REST API
and these tools.

Whose memories a call sees comes only from who is calling, decided by the
same rules as the REST API (gateway/memories_access.py): a per-user gateway
key acts for its user; the admin key (or, with no admin key configured, a
local client) acts for the user its identity header names (`X-User-Id`).
Never from a tool argument or the URL: an agent cannot be talked into
reading someone else's memories.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

from litestar import asgi
from litestar.handlers import ASGIRouteHandler
from litestar.types import Receive, Scope, Send
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp.server.transport_security import TransportSecuritySettings

from gateway.errors import GatewayError
from gateway.identity import IdentityResolver, scope_for
from gateway.memories_access import Access
from memory import models
from memory.clipping import search_query
from memory.engine import MemoryEngine

logger = logging.getLogger("gateway")

PATH = "/mcp"
MAX_LIMIT = 100

INSTRUCTIONS = (
    "Long-term memory of the user you are working with, kept across"
    " conversations and apps. Search it before answering questions that depend"
    " on who the user is or what they told you before; add short, self-contained"
    " facts worth remembering (preferences, circumstances, decisions); update or"
    " delete a memory that has become wrong. Only this user's memories are"
    " visible here."
)


def _memory(m: models.Memory) -> dict[str, Any]:
    return {
        "id": m.id,
        "text": m.text,
        "created_at": m.created_at.isoformat(),
        "updated_at": m.updated_at.isoformat(),
    }


def _limit(value: int, name: str, top: int = MAX_LIMIT) -> int:
    if not 1 <= value <= top:
        raise ToolError(f"{name} must be between 1 and {top}")
    return value


class MemoryTools:
    """The tools, bound to the gateway's engine and its access rules."""

    def __init__(
        self,
        engine: Callable[[], MemoryEngine | None],
        access: Access,
        identity: IdentityResolver,
    ) -> None:
        self._engine = engine
        self._access = access
        self._identity = identity

    def caller(self, headers: Mapping[str, str], client_host: str | None) -> str | None:
        """The user a per-user key binds the caller to (None: an administrator);
        raises the 401 `GatewayError` for anyone else."""
        return self._access.principal_of(headers, client_host).user_id

    def _context(self, ctx: Context[Any]) -> tuple[MemoryEngine, models.Scope]:
        request = ctx.request_context.request
        if request is None:  # pragma: no cover - only HTTP is served
            raise ToolError("no HTTP request behind this call")
        headers: Mapping[str, str] = request.headers
        client = request.client
        try:
            key_user = self.caller(headers, client.host if client else None)
            named, agent = self._identity.named_in_headers(headers)
            scope = scope_for(named, agent, key_user=key_user)
        except GatewayError as exc:
            hint = ""
            if exc.code == "missing_user_id":
                header = self._identity.user_header_name
                hint = f": the admin key acts for the user named in the {header} header"
            raise ToolError(f"{exc.message}{hint}") from None
        engine = self._engine()
        if engine is None:
            raise ToolError("the memory engine is starting; try again in a moment")
        return engine, scope

    async def add_memory(self, text: str, ctx: Context[Any]) -> dict[str, Any]:
        """Remember a fact about the user, stored as given (a fact already
        stored is not stored twice). Returns the memory."""
        engine, scope = self._context(ctx)
        try:
            result = await engine.add(scope, text=text, infer=False)
        except ValueError as exc:
            raise ToolError(str(exc)) from None
        return _memory(result.memories[0])

    async def search_memories(
        self, query: str, ctx: Context[Any], limit: int = 10
    ) -> dict[str, Any]:
        """The user's memories most relevant to `query`, best first."""
        engine, scope = self._context(ctx)
        hits = await engine.store.search(scope, search_query(query), limit=_limit(limit, "limit"))
        return {"results": [{**_memory(h.memory), "score": round(h.score, 4)} for h in hits]}

    async def list_memories(
        self, ctx: Context[Any], limit: int = 50, offset: int = 0
    ) -> dict[str, Any]:
        """The user's memories, oldest first, a page at a time."""
        engine, scope = self._context(ctx)
        if offset < 0:
            raise ToolError("offset must not be negative")
        memories = await engine.store.list(scope, limit=_limit(limit, "limit", 1000), offset=offset)
        return {"memories": [_memory(m) for m in memories]}

    async def update_memory(self, id: str, text: str, ctx: Context[Any]) -> dict[str, Any]:
        """Replace the text of one of the user's memories (its id stays)."""
        engine, scope = self._context(ctx)
        try:
            memory = await engine.update(scope, id, text=text)
        except ValueError as exc:
            raise ToolError(str(exc)) from None
        if memory is None:
            raise ToolError(f"the user has no memory with id {id!r}")
        return _memory(memory)

    async def delete_memory(self, id: str, ctx: Context[Any]) -> dict[str, Any]:
        """Delete one of the user's memories."""
        engine, scope = self._context(ctx)
        if not await engine.store.delete(scope, id):
            raise ToolError(f"the user has no memory with id {id!r}")
        return {"deleted": 1}

    async def forget_all(self, ctx: Context[Any], confirm: bool = False) -> dict[str, Any]:
        """Erase every memory of the user, with their history. Irreversible:
        only with `confirm` true, and only when the user asked for it."""
        engine, scope = self._context(ctx)
        if not confirm:
            raise ToolError("this erases every memory of the user; call again with confirm=true")
        return {"deleted": await engine.delete_all(scope)}


def create_mcp_server(tools: MemoryTools) -> MCPServer:
    server: MCPServer = MCPServer(name="memory-gateway", instructions=INSTRUCTIONS)
    for tool in (
        tools.add_memory,
        tools.search_memories,
        tools.list_memories,
        tools.update_memory,
        tools.delete_memory,
        tools.forget_all,
    ):
        server.add_tool(tool)
    # Stateless JSON: every call is one POST, served by whichever worker takes
    # it. The SDK's Host/Origin check is off: `MemoryTools.caller` applies the
    # gateway's own (a local client must address it by a loopback name).
    server.streamable_http_app(
        streamable_http_path=PATH,
        stateless_http=True,
        json_response=True,
        transport_security=TransportSecuritySettings(enable_dns_rebinding_protection=False),
    )
    return server


def mcp_route(server: MCPServer, tools: MemoryTools) -> ASGIRouteHandler:
    """`/mcp`, answered by the MCP server once the caller is known: anyone
    else gets a 401 in the gateway's error shape before MCP sees the call."""

    @asgi(PATH, is_mount=True, copy_scope=True)
    async def handle(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":  # pragma: no cover - websockets are not routed here
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        client = scope.get("client")
        # A stranger's 401 is raised here, in the gateway's error shape.
        tools.caller(headers, client[0] if client else None)
        # Litestar's and Starlette's ASGI types differ only in their annotations.
        serve: Any = server.session_manager.handle_request
        await serve(scope, receive, send)

    return handle


@contextlib.asynccontextmanager
async def running(server: MCPServer) -> AsyncIterator[None]:
    """The MCP session manager's task group, for the app's lifespan (a mounted
    app's own lifespan does not run)."""
    async with server.session_manager.run():
        yield
