"""The gateway's HTTP surface: health, readiness, the chat APIs, and every other /v1/ path."""

from __future__ import annotations

from typing import Any

import msgspec
from litestar import Request, Response, get, route
from litestar.enums import HttpMethod
from litestar.response.base import ASGIResponse

from gateway.apis.anthropic_messages import ANTHROPIC_MESSAGES
from gateway.apis.responses import RESPONSES
from gateway.proxy import Proxy

ALL_METHODS = [
    HttpMethod.GET,
    HttpMethod.POST,
    HttpMethod.PUT,
    HttpMethod.PATCH,
    HttpMethod.DELETE,
    HttpMethod.HEAD,
    HttpMethod.OPTIONS,
]


def _proxy(request: Request[Any, Any, Any]) -> Proxy:
    proxy: Proxy = request.app.state.proxy
    return proxy


@get("/health", sync_to_thread=False, include_in_schema=False)
def health() -> Response[bytes]:
    return Response(content=b'{"status":"ok"}', media_type="application/json")


@get("/ready", include_in_schema=False)
async def ready(request: Request[Any, Any, Any]) -> Response[bytes]:
    hooks = _proxy(request).hooks
    if await hooks.ready():
        body = {"status": "ready", **await hooks.notes()}
        return Response(content=msgspec.json.encode(body), media_type="application/json")
    return Response(
        content=b'{"status":"not ready"}', status_code=503, media_type="application/json"
    )


@route("/v1/chat/completions", http_method=ALL_METHODS, include_in_schema=False)
async def chat_completions(request: Request[Any, Any, Any]) -> ASGIResponse:
    return await _proxy(request).chat(request)


@route("/v1/responses", http_method=ALL_METHODS, include_in_schema=False)
async def responses(request: Request[Any, Any, Any]) -> ASGIResponse:
    return await _proxy(request).chat(request, RESPONSES)


@route("/v1/messages", http_method=ALL_METHODS, include_in_schema=False)
async def messages(request: Request[Any, Any, Any]) -> ASGIResponse:
    return await _proxy(request).chat(request, ANTHROPIC_MESSAGES)


@route("/v1/messages/{path:path}", http_method=ALL_METHODS, include_in_schema=False)
async def messages_other(request: Request[Any, Any, Any]) -> ASGIResponse:
    """`count_tokens` and the message batches: verbatim, to an Anthropic upstream."""
    return await _proxy(request).passthrough(request, "anthropic")


@route("/v1/{path:path}", http_method=ALL_METHODS, include_in_schema=False)
async def passthrough(request: Request[Any, Any, Any]) -> ASGIResponse:
    return await _proxy(request).passthrough(request)


handlers = [health, ready, chat_completions, responses, messages, messages_other, passthrough]
