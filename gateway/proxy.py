"""Forwarding: one request in, one request upstream, the answer back untouched.

Chat completions go through the two hook seams; every other `/v1/` path is
relayed verbatim with bodies streamed both ways. Response bytes are never
re-chunked or re-serialized: each upstream chunk is handed to the ASGI server
as soon as it arrives.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import anyio
import httpx
import msgspec
from litestar import Request
from litestar.background_tasks import BackgroundTask
from litestar.response.base import ASGIResponse
from litestar.response.streaming import ASGIStreamingResponse

from gateway.apis import ChatApi
from gateway.apis.chat_completions import CHAT_COMPLETIONS
from gateway.chat_activity import ChatActivity
from gateway.config import Config
from gateway.errors import GatewayError
from gateway.forward import client_response_headers, upstream_request_headers
from gateway.hooks import ChatContext, ChatHooks, NoHooks
from gateway.identity import IdentityResolver
from gateway.key_store import KeyStore
from gateway.metrics import Metrics
from gateway.observe import CHAT_STATE
from gateway.relay import Recorder, release, stream_chat
from gateway.routing import Api, Router, Upstream
from gateway.transport import upstream_client
from gateway.upstream_errors import upstream_error

# Passthrough bodies up to this size are read whole to route by their `model`;
# larger ones are streamed to the default upstream.
ROUTING_PEEK_BYTES = 1024 * 1024


class _Model(msgspec.Struct):
    model: str | None = None


_model_decoder = msgspec.json.Decoder(_Model)


def _peek_model(raw: bytes) -> str | None:
    try:
        return _model_decoder.decode(raw).model
    except msgspec.DecodeError:
        return None


def _upstream_url(upstream: Upstream, request: Request[Any, Any, Any]) -> str:
    scope = request.scope
    raw_path: bytes | None = scope.get("raw_path")  # type: ignore[assignment]
    path = raw_path.decode("latin-1") if raw_path else scope["path"]
    # Drop the leading "/v1": base_url already ends with its version prefix.
    url = upstream.base_url + path[3:]
    query: bytes = scope.get("query_string", b"")  # type: ignore[assignment]
    return f"{url}?{query.decode('latin-1')}" if query else url


def _bad_request(
    message: str, *, param: str | None = None, code: str | None = None
) -> GatewayError:
    return GatewayError(400, message, param=param, code=code, retryable=False)


class Proxy:
    def __init__(
        self,
        config: Config,
        hooks: ChatHooks,
        activity: ChatActivity | None = None,
        issued_keys: KeyStore | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.config = config
        self._metrics = metrics
        # Chat requests in flight per upstream, which extraction yields to
        # (gateway/chat_activity.py); this process's own when not given.
        self.activity = activity if activity is not None else ChatActivity.for_config(config)
        self.hooks = hooks
        self.router = Router(config)
        self.identity = IdentityResolver(config.auth, config.identity, issued_keys)
        self._consumed = frozenset(h.encode() for h in self.identity.consumed_headers)
        self._max_body = config.server.max_body_bytes
        self._client: httpx.AsyncClient | None = None
        # A plain proxy has nobody to hand the exchange to: skip reading the copy.
        self._recorder = None if isinstance(hooks, NoHooks) else Recorder(hooks, metrics)

    @property
    def client(self) -> httpx.AsyncClient:
        if self._client is None:
            raise RuntimeError("the proxy is not started")
        return self._client

    async def start(self) -> None:
        self._client = upstream_client(self.config.http)

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    async def _send(self, request: httpx.Request, upstream: Upstream) -> httpx.Response:
        started = time.perf_counter()
        try:
            return await self.client.send(request, stream=True)
        except httpx.TransportError as exc:
            raise upstream_error(exc, upstream, "send") from None
        finally:
            if self._metrics is not None:
                self._metrics.upstream(upstream.name, time.perf_counter() - started)

    # -- chat completions -------------------------------------------------

    async def chat(
        self, request: Request[Any, Any, Any], api: ChatApi = CHAT_COMPLETIONS
    ) -> ASGIResponse:
        """A request of one of the chat APIs (`api`): memories in, answer out
        untouched, the exchange recorded. Other methods pass through."""
        if request.method != "POST":
            return await self.passthrough(request, api.upstream_api)
        identity = self.identity.from_headers(request.headers)
        raw = await request.body()
        try:
            body = msgspec.json.decode(raw)
        # Invalid UTF-8 in a string and absurd nesting raise outside DecodeError.
        except (msgspec.DecodeError, UnicodeDecodeError, RecursionError) as exc:
            raise _bad_request(
                f"the request body is not valid JSON: {exc}", code="invalid_json"
            ) from None
        if not isinstance(body, dict):
            raise _bad_request("the request body must be a JSON object", code="invalid_json")
        api.check(body)
        self.identity.from_body(identity, body, api.user_fields)
        upstream = self.router.pick(body.get("model"), api.upstream_api)
        stream = body.get("stream") is True
        ctx = ChatContext(
            identity=identity,
            request_headers=request.headers,
            stream=stream,
            api=api,
            upstream=upstream.name,
            model=model if isinstance(model := body.get("model"), str) else None,
        )
        # For the request's metrics, log line and the console (gateway/observe.py).
        request.scope["state"][CHAT_STATE] = ctx

        # In flight from its arrival (its memory lookup included, so an
        # extraction call cannot slip in just ahead of it) until the answer is
        # relayed or abandoned: the lease is released on every path (errors,
        # disconnects, cancellation).
        lease = self.activity.begin(upstream.name)
        try:
            work = api.working_copy(body)
            rewritten = await self.hooks.before_forward(ctx, work)
            content = msgspec.json.encode(work) if rewritten else raw
            headers, ctx.upstream_api_key = upstream_request_headers(
                request.scope["headers"],  # type: ignore[arg-type]
                upstream=upstream,
                identity=identity,
                consumed=self._consumed,
                identity_encoding=True,
            )
            up_request = self.client.build_request(
                "POST", _upstream_url(upstream, request), headers=headers, content=content
            )
            response = await self._send(up_request, upstream)
            if stream and response.is_success:
                # The stream's relay, or its clean-up, releases the lease.
                return stream_chat(response, ctx, body, upstream, lease, self._recorder)
        except BaseException:
            lease.release()
            raise
        try:
            data = await response.aread()
        except httpx.HTTPError as exc:
            raise upstream_error(exc, upstream, "read") from None
        finally:
            lease.release()
            await response.aclose()
        recorder = self._recorder
        if recorder is not None and not stream and response.is_success:
            completion = api.parse(data)
            if completion is not None:
                await recorder.complete(
                    ctx, body, completion.text, completion.finish_reason, completion.tool_calls
                )
        return ASGIResponse(
            body=data,
            status_code=response.status_code,
            headers=client_response_headers(
                response.headers.multi_items(), decoded=True, extra=ctx.response_headers
            ),
        )

    # -- everything else under /v1/ --------------------------------------

    async def passthrough(
        self, request: Request[Any, Any, Any], api: Api = "openai"
    ) -> ASGIResponse:
        """Relay verbatim to the upstream of the body's model among those
        speaking `api` (/v1/messages/count_tokens goes to an Anthropic one)."""
        identity = self.identity.from_headers(request.headers)
        raw_headers: list[tuple[bytes, bytes]] = request.scope["headers"]  # type: ignore[assignment]
        length: int | None = None
        chunked = False
        json_body = False
        for name, value in raw_headers:
            if name == b"content-length":
                try:
                    length = int(value)
                except ValueError:
                    raise _bad_request("invalid Content-Length") from None
            elif name == b"transfer-encoding":
                chunked = True
            elif name == b"content-type":
                json_body = b"json" in value
        if length is not None and length > self._max_body:
            raise GatewayError(
                413,
                "request body is larger than the configured server.max_body_bytes",
                code="request_too_large",
                retryable=False,
            )

        content: bytes | AsyncIterator[bytes] | None = None
        model: str | None = None
        if length is not None and ((length <= ROUTING_PEEK_BYTES and json_body) or length == 0):
            content = await request.body()
            model = _peek_model(content) if content else None
        elif length is not None or chunked:
            content = _body_chunks(request)
        upstream = self.router.pick(model, api)
        headers, _ = upstream_request_headers(
            raw_headers,
            upstream=upstream,
            identity=identity,
            consumed=self._consumed,
            keep_length=isinstance(content, AsyncIterator),
        )
        up_request = self.client.build_request(
            request.method, _upstream_url(upstream, request), headers=headers, content=content
        )
        response = await self._send(up_request, upstream)

        async def relay() -> AsyncIterator[bytes]:
            try:
                async for chunk in response.aiter_raw():
                    yield chunk
            finally:
                with anyio.CancelScope(shield=True):
                    await response.aclose()

        iterator = relay()
        return ASGIStreamingResponse(
            iterator=iterator,
            status_code=response.status_code,
            # A list keeps repeated headers (set-cookie); the base class accepts it.
            headers=client_response_headers(  # type: ignore[arg-type]
                response.headers.multi_items(), decoded=False
            ),
            is_head_response=request.method == "HEAD",
            background=BackgroundTask(release, iterator, response),
        )


async def _body_chunks(request: Request[Any, Any, Any]) -> AsyncIterator[bytes]:
    async for chunk in request.stream():
        if chunk:
            yield chunk
