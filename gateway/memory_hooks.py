"""Where a chat request gets its memories, and where its exchange is recorded.

The read path runs before forwarding, under a deadline: memory may make a
request a few milliseconds slower, never make it fail. The write path runs
after a successful completion, off the request path: the new user turns and
the reply go to the engine's durable spool.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, Literal, cast

import httpx

from gateway.config import Config
from gateway.errors import GatewayError
from gateway.hooks import ChatContext, CompletedExchange
from gateway.identity import scope_for
from gateway.metrics import Metrics
from memory import injection
from memory.clipping import search_query
from memory.engine import MemoryEngine, open_when_possible
from memory.errors import TRANSIENT
from memory.extraction import KEYLESS, CallGate
from memory.handoff import HandoffSender
from memory.models import Exchange, Hit, Scope
from memory.observer import NO_OBSERVER

logger = logging.getLogger("gateway.memory")

Mode = Literal["auto", "read", "write", "off"]
MODES: frozenset[str] = frozenset({"auto", "read", "write", "off"})
MODE_HEADER = "x-memory-mode"
RECORD_HEADER = "x-memory-record"
RECORDS = frozenset({"exchange", "user"})
# Response headers have practical size limits; ids beyond this are left out.
MAX_IDS_HEADER = 1024
WARMUP_USER = "memory-gateway-warmup"


class MemoryHooks:
    """The memory engine behind the chat pipeline's two seams."""

    def __init__(
        self,
        config: Config,
        handoff: HandoffSender | None = None,
        *,
        upstream_client: Callable[[], httpx.AsyncClient] | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.config = config
        self.metrics = metrics
        self.memory = config.memory
        # The proxy's client: the extraction model's calls share its pool.
        self._upstream_client = upstream_client
        # Set when the extraction process runs the spool's jobs (gateway/supervisor.py).
        self._handoff = handoff
        # Where extraction calls go and which key may go there (one rule, in config).
        self._extraction = config.extraction
        # Entered around each extraction call made in this process.
        self.call_gate: CallGate | None = None
        self._engine: MemoryEngine | None = None
        # Retries opening the engine when it could not be opened at start-up.
        self._opener: asyncio.Task[None] | None = None

    @property
    def engine(self) -> MemoryEngine:
        if self._engine is None:
            raise RuntimeError("the memory engine is not started")
        return self._engine

    @property
    def opened(self) -> MemoryEngine | None:
        """The engine, or None while it could not be opened."""
        return self._engine

    async def startup(self) -> None:
        """Open the engine; if the embedder cannot be reached yet, serve chat
        without memory and keep trying in the background (no crash loop)."""
        try:
            await self._open()
        except TRANSIENT as exc:
            logger.error(
                "memory is unavailable, serving without it and retrying: %s: %s",
                type(exc).__name__,
                str(exc)[:300],
            )
            self._opener = asyncio.create_task(self._open_until_done(), name="memory-open")

    async def _open(self) -> MemoryEngine:
        engine = await MemoryEngine.open(
            self.memory,
            self.config.data_path,
            storage=self.config.storage,
            queue=self.config.queue,
            default_base_url=self.config.default_upstream.base_url,
            handoff=self._handoff,
            http_client=self._upstream_client() if self._upstream_client is not None else None,
            extraction_key=self._extraction.api_key,
            key_source=self._extraction.key_source,
            call_gate=self.call_gate,
            observer=self.metrics.observer() if self.metrics is not None else NO_OBSERVER,
        )
        try:
            await engine.start()
            # The first query pays for lazy loading (model, table, indices); pay it
            # here rather than against the first user's retrieval deadline.
            await engine.store.search(Scope(user_id=WARMUP_USER), "warm-up query")
        except BaseException:
            await engine.close()
            raise
        self._engine = engine
        return engine

    async def _open_until_done(self) -> None:
        if await open_when_possible(self._open) is None:
            logger.error("memory stays unavailable; serving without it")

    async def shutdown(self) -> None:
        opener, self._opener = self._opener, None
        if opener is not None:
            opener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await opener
        if self._engine is not None:
            await self._engine.close()
            self._engine = None

    async def ready(self) -> bool:
        return self._engine is not None and await self._engine.ready()

    async def notes(self) -> dict[str, str]:
        # Failing extraction does not make the gateway unready: chat works, and
        # a restart would not bring a missing model back or fix a refused key.
        notes: dict[str, str] = {}
        if self._engine is not None:
            status = await self._engine.extraction_status()
            if status.status == "failing":
                notes["extraction"] = "failing"
        data_dir = self.config.data_path
        if not await asyncio.to_thread(os.access, data_dir, os.W_OK):
            # Exchanges and memory edits fail until it is writable again.
            notes["storage"] = f"the data directory {str(data_dir)!r} is not writable"
        return notes

    def _mode(self, ctx: ChatContext) -> Mode:
        value = ctx.request_headers.get(MODE_HEADER)
        if value is None:
            return self.memory.mode
        mode = value.strip().lower()
        if mode not in MODES:
            raise GatewayError(
                400,
                f"X-Memory-Mode must be one of auto, read, write, off (got {value[:40]!r})",
                param="X-Memory-Mode",
                code="invalid_memory_mode",
                retryable=False,
            )
        return cast(Mode, mode)

    def _record_reply(self, ctx: ChatContext) -> bool:
        value = ctx.request_headers.get(RECORD_HEADER)
        record: str
        if value is None:
            record = self.memory.record_by_path.get(ctx.api.path, self.memory.record)
        else:
            record = value.strip().lower()
            if record not in RECORDS:
                raise GatewayError(
                    400,
                    f"X-Memory-Record must be exchange or user (got {value[:40]!r})",
                    param="X-Memory-Record",
                    code="invalid_memory_record",
                    retryable=False,
                )
        return record == "exchange"

    async def before_forward(self, ctx: ChatContext, body: dict[str, Any]) -> bool:
        mode = self._mode(ctx)
        ctx.memory_mode = mode
        ctx.record_reply = self._record_reply(ctx)
        headers = ctx.response_headers
        user_id = ctx.identity.user_id
        if user_id is None:
            headers["X-Memory-Status"] = "no-user"
            return False
        if not self.memory.enabled or mode == "off":
            headers["X-Memory-Status"] = "off"
            return False
        if self._engine is None:
            # Not open yet (see `startup`): the answer goes out without memory.
            headers["X-Memory-Status"] = "unavailable"
            return False
        ident = ctx.identity
        scope = ctx.memory_scope = scope_for(user_id, ident.agent_id, ident.session_id)
        headers["X-Memory-Status"] = (
            "ok; extraction=failing" if self._engine.extraction_failing() else "ok"
        )
        headers["X-Memory-Injected"] = "0"
        if mode == "write":
            return False
        query = search_query(ctx.api.query(body))
        if not query:
            return False
        hits = await self._recall(scope, query, headers)
        if not hits:
            return False
        text, used = injection.render(hits, self.memory.injection.max_chars)
        if text is None:
            return False
        ctx.api.inject(body, text, self.memory.injection.position)
        headers["X-Memory-Injected"] = str(len(used))
        headers["X-Memory-Ids"] = _bounded_ids(used)
        return True

    async def _recall(self, scope: Scope, query: str, headers: dict[str, str]) -> list[Hit]:
        """Search under the deadline; on timeout or failure go on without memories."""
        deadline = self.memory.injection.deadline_ms / 1000
        started = time.perf_counter()
        outcome = "ok"
        try:
            return await asyncio.wait_for(self.engine.store.search(scope, query), deadline)
        except TimeoutError:
            outcome = "timeout"
            logger.warning("memory search exceeded its %.0f ms deadline", deadline * 1000)
        except Exception:
            outcome = "error"
            logger.exception("memory search failed; answering without memories")
        finally:
            if self.metrics is not None:
                self.metrics.retrieved(outcome, time.perf_counter() - started)
        headers["X-Memory-Status"] = "degraded"
        return []

    async def after_completion(self, ctx: ChatContext, exchange: CompletedExchange) -> None:
        scope = ctx.memory_scope
        if scope is None:
            return
        # The key is known only once the request was forwarded. A bring-your-own-key
        # user's next request releases their jobs that wait for one (e.g. after a
        # restart): recording the exchange hands the key over with it, in one
        # message to the extraction process; a request that records nothing
        # hands it over alone.
        key = self._extraction_key(ctx)
        turns: list[dict[str, Any]] = []
        if ctx.memory_mode in ("auto", "write"):
            turns = ctx.api.new_turns(exchange.request_body)
        if not turns:
            self.engine.provide_key(scope.user_id, key)
            ctx.recorded = "nothing new"
            return
        try:
            ctx.recorded = await self.engine.record_exchange(
                Exchange(
                    scope=scope,
                    messages=turns,
                    reply=(exchange.reply_text or None) if ctx.record_reply else None,
                    at=datetime.now(UTC),
                ),
                api_key=key,
            )
        except Exception as exc:
            self.engine.provide_key(scope.user_id, key)
            ctx.recorded = "refused by the spool"
            # Fail open: the answer still goes out. But an exchange that never
            # reached the spool is lost for memory, and the operator must know
            # (a full disk is the usual cause).
            logger.error(
                "exchange of user %r NOT recorded for memory, the spool refused it: %s: %s",
                scope.user_id[:64],
                type(exc).__name__,
                exc,
            )

    def _extraction_key(self, ctx: ChatContext) -> str | None:
        """The key this request lends to its user's extraction jobs: the key
        it sent upstream, and only when that upstream is the extraction
        endpoint (a key never goes anywhere it was not configured or sent
        for). A request that reached a keyless upstream (a local vLLM or
        Ollama) carried none; its jobs get a placeholder such servers ignore,
        so they do not wait forever for a key."""
        if self._extraction.api_key or ctx.upstream != self._extraction.upstream:
            return None
        return ctx.upstream_api_key or KEYLESS


def _bounded_ids(hits: list[Hit]) -> str:
    ids: list[str] = []
    size = 0
    for hit in hits:
        size += len(hit.memory.id) + 1
        if size > MAX_IDS_HEADER:
            break
        ids.append(hit.memory.id)
    return ",".join(ids)
