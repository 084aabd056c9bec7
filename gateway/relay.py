"""The chat answer on its way back: relayed untouched, watched, and handed on.

`stream_chat` relays a streamed answer chunk by chunk while a parser (the
request's API's, gateway/apis/) reads a copy; `Recorder` hands the finished
exchange to the after-completion seam (streamed or not) and counts streams
the server cut short. `release` closes a relayed response whatever way it
ended.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

import anyio
import httpx
from litestar.background_tasks import BackgroundTask
from litestar.response.base import ASGIResponse
from litestar.response.streaming import ASGIStreamingResponse

from gateway.chat_activity import ChatLease
from gateway.forward import client_response_headers
from gateway.hooks import ChatContext, ChatHooks, CompletedExchange
from gateway.metrics import Metrics
from gateway.routing import Upstream
from gateway.upstream_errors import upstream_error

logger = logging.getLogger("gateway")


class Recorder:
    """Hands finished exchanges to the hooks; counts cut-short streams."""

    def __init__(self, hooks: ChatHooks, metrics: Metrics | None = None) -> None:
        self.hooks = hooks
        self._metrics = metrics
        # Streams that ended without a finish_reason (see `cut_stream`).
        self.cut_streams = 0

    async def complete(
        self,
        ctx: ChatContext,
        body: dict[str, Any],
        text: str | None,
        finish_reason: str | None,
        tool_calls: bool,
    ) -> None:
        """Hand the exchange on before the client has the whole answer.

        Awaited, not spawned: a process killed just after the answer went out
        must not lose an exchange the client saw complete. The hook only makes
        it durable (a spool insert); the slow work runs later, off the request.
        """
        exchange = CompletedExchange(
            request_body=body, reply_text=text, finish_reason=finish_reason, tool_calls=tool_calls
        )
        try:
            await self.hooks.after_completion(ctx, exchange)
        except Exception:
            logger.exception("after_completion failed; the answer goes out regardless")

    def cut_stream(self, upstream: Upstream) -> None:
        """Count streams that ended without a finish_reason; say so at the
        1st, 10th, 100th... so a busy one-slot server does not flood the log."""
        self.cut_streams += 1
        if self._metrics is not None:
            self._metrics.stream_cut(upstream.name)
        n = self.cut_streams
        if n == 10 ** (len(str(n)) - 1):
            logger.warning(
                "a stream from upstream %s ended without a finish reason (%d so far):"
                " the answer was cut short, and that exchange is not recorded for memory;"
                " a one-slot server interrupting it for another request? (llama-cpp-python:"
                " --interrupt_requests False; docs/memory.md, local model servers)",
                upstream.name,
                n,
            )


def stream_chat(
    response: httpx.Response,
    ctx: ChatContext,
    body: dict[str, Any],
    upstream: Upstream,
    lease: ChatLease,
    recorder: Recorder | None,
) -> ASGIResponse:
    """Relay a successful streamed answer; with a `recorder`, watch a copy and
    hand the exchange on once the stream's end arrives (`[DONE]`, or the
    API's terminal event). The lease is released when the relay ends,
    however it ends."""
    parser = ctx.api.parser()
    feed = parser.feed if recorder is not None else None

    async def record() -> None:
        assert recorder is not None
        if parser.error:
            return
        if parser.finish_reason is None:
            # [DONE] without a finish_reason: the server ended the answer
            # early (llama-cpp-python gives its one slot to the next
            # request): an unfinished answer is not remembered.
            recorder.cut_stream(upstream)
            return
        await recorder.complete(ctx, body, parser.text, parser.finish_reason, parser.tool_calls)

    async def relay() -> AsyncIterator[bytes]:
        tail = b"\n\n"
        recorded = False
        try:
            async for chunk in response.aiter_bytes():
                if feed is not None:
                    feed(chunk)
                    # The client stops at [DONE]: the exchange is made durable
                    # before the bytes that complete the answer leave.
                    if parser.done and not recorded:
                        recorded = True
                        await record()
                tail = chunk if len(chunk) >= 4 else (tail + chunk)[-4:]
                yield chunk
        except httpx.HTTPError as exc:
            # Never a fake end: the SDKs raise on an `error` event.
            error = upstream_error(exc, upstream, "stream")
            # A partial event is terminated first, so the error stands alone.
            between = tail.endswith((b"\n\n", b"\r\n\r\n", b"\r\r"))
            yield (b"" if between else b"\n\n") + ctx.api.stream_error(
                error.message, error.code or "upstream_error"
            )
            return
        finally:
            lease.release()
            with anyio.CancelScope(shield=True):
                await response.aclose()
        if feed is None or recorded:
            return
        # A final `data: [DONE]` without its blank line still completes the answer.
        parser.close()
        if parser.done:
            await record()

    iterator = relay()
    return ASGIStreamingResponse(
        iterator=iterator,
        status_code=response.status_code,
        # A list keeps repeated headers (set-cookie); the base class accepts it.
        headers=client_response_headers(  # type: ignore[arg-type]
            response.headers.multi_items(), decoded=True, extra=ctx.response_headers
        ),
        # The relay's `finally` releases the lease; so does this clean-up,
        # should the relay never have started (idempotent).
        background=BackgroundTask(release, iterator, response, lease),
    )


async def release(iterator: Any, response: httpx.Response, lease: ChatLease | None = None) -> None:
    """Runs after the response, even when the client went away mid-stream.

    Litestar cancels a streaming response without closing its generator
    (litestar#3772); closing both here guarantees the upstream connection is
    released instead of leaking until garbage collection, and the chat is no
    longer counted in flight.
    """
    if lease is not None:
        lease.release()
    with anyio.CancelScope(shield=True):
        await iterator.aclose()
        await response.aclose()
