"""Each HTTP request as operators see it: counted and timed for `/metrics`,
kept in the console's list of recent chats, and at debug level one log line
per chat saying what memory did.

It wraps Litestar's request handling (inside the app, outside its router and
error handlers), so every answer is seen: handled, refused with an error,
or not found. A chat request leaves its `ChatContext` in the scope's state
(gateway/proxy.py); what memory did is read from it once the answer is out.
The log line names memory ids and counts, never memory text or keys.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from litestar.types import ASGIApp, Message, Receive, Scope, Send

from gateway.recent_requests import RecentRequests, RequestRecord

if TYPE_CHECKING:
    from gateway.hooks import ChatContext
    from gateway.metrics import Metrics

logger = logging.getLogger("gateway.requests")

# Where the proxy leaves a chat request's context (scope["state"]).
CHAT_STATE = "memory_gateway.chat"
UNMATCHED = "unmatched"


def chat_memory_status(ctx: ChatContext) -> str:
    """The memory status without its details ("ok; extraction=failing" is "ok")."""
    value = ctx.response_headers.get("X-Memory-Status", "off")
    return value.split(";", 1)[0].strip()


class RequestObserver:
    """ASGI middleware around the app's handler."""

    def __init__(self, app: ASGIApp, metrics: Metrics | None, recent: RecentRequests) -> None:
        self.app = app
        self.metrics = metrics
        self.recent = recent

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        arrived = time.time()
        started = time.perf_counter()
        status = 500  # what the client is told when the app fails before answering

        async def observed_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, observed_send)
        finally:
            self._done(scope, status, arrived, time.perf_counter() - started)

    def _done(self, scope: Scope, status: int, arrived: float, seconds: float) -> None:
        route: str = scope.get("path_template") or UNMATCHED  # type: ignore[assignment]
        if self.metrics is not None:
            method: str = scope["method"]  # type: ignore[typeddict-item]  # http only
            self.metrics.request(route, method, status, seconds)
        state: dict[str, Any] = scope.get("state") or {}  # type: ignore[assignment]
        ctx: ChatContext | None = state.get(CHAT_STATE)
        if ctx is None:
            return
        memory_status = chat_memory_status(ctx)
        injected = int(ctx.response_headers.get("X-Memory-Injected", "0") or 0)
        if self.metrics is not None:
            self.metrics.chat_memory(memory_status, injected)
        self.recent.add(
            RequestRecord(
                id=self.recent.next_id(),
                at=arrived,
                path=ctx.api.path,
                model=ctx.model or "",
                upstream=ctx.upstream or "",
                status=status,
                memory_status=memory_status,
                injected=injected,
                stream=ctx.stream,
                user_id=ctx.identity.user_id,
                duration_ms=round(seconds * 1000, 3),
            )
        )
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug(
                "%s %s model=%s upstream=%s user=%s memory=%s injected=%d ids=%s recorded=%s"
                " %.1f ms",
                ctx.api.path,
                status,
                (ctx.model or "-")[:80],
                ctx.upstream or "-",
                (ctx.identity.user_id or "-")[:64],
                ctx.response_headers.get("X-Memory-Status", "off"),
                injected,
                ctx.response_headers.get("X-Memory-Ids", "-"),
                ctx.recorded or "-",
                seconds * 1000,
            )
