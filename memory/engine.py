"""`MemoryEngine`: the one object the gateway talks to.

It wires the store, the embedder, the extractor, the spool and its workers.
Exchanges are redacted, then spooled durably, then acknowledged; workers turn
them into facts in the background. With no `memory.llm.api_key`, the key of
the user's latest request is used for their jobs; it lives in this process's
memory only, and a job whose user has no known key waits (no attempt spent).
"""

from __future__ import annotations

import asyncio
import builtins
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import httpx
import msgspec
import numpy as np

from memory.config import MemoryConfig
from memory.embedding import Embedder, EmbedderError, create_embedder
from memory.extraction import ExtractionError, Extractor
from memory.handoff import HandoffSender
from memory.locks import FileLock, locked
from memory.maintenance import Maintenance
from memory.messages import user_texts
from memory.models import (
    Exchange,
    HistoryEntry,
    Hit,
    ImportResult,
    Memory,
    Operation,
    Scope,
    Stats,
)
from memory.prompts import conversation_lines
from memory.redaction import REDACTED, redact, redact_exchange
from memory.spool import Job, JobInfo, JobState, Spool
from memory.store import MemoryStore
from memory.workers import Deferred, LeaseLost, WorkerPool

log = logging.getLogger("memory.engine")
T = TypeVar("T")

# The related-memory search of a job embeds at most this much of its user text:
# the cost of the local embedder grows with length, and the facts to update are
# about what the user just said, not about the app's system prompt or the reply.
RELATED_QUERY_CHARS = 1000
STORE_DIR = "lancedb"
SPOOL_FILE = "spool.sqlite3"
OPEN_LOCK = "open.lock"
MAINTENANCE_LOCK = "maintenance.lock"

_memory_encoder = msgspec.json.Encoder()
_memory_decoder = msgspec.json.Decoder(Memory)


class AddResult(msgspec.Struct, kw_only=True):
    """`add` either stored memories directly (infer=False) or queued a job."""

    memories: list[Memory] = msgspec.field(default_factory=list)
    job_id: str | None = None


class InvalidImport(ValueError):
    """A line of an import is not a memory; nothing was imported."""


async def _uncancellable(aw: Awaitable[T]) -> T:
    """Let a started write finish even if the caller is cancelled, then re-raise.

    A LanceDB write abandoned half-way would race with whatever the canceller
    does next (erasing the user, closing the store).
    """
    task = asyncio.ensure_future(aw)
    cancelled = False
    while True:
        try:
            result = await asyncio.shield(task)
            break
        except asyncio.CancelledError:
            if task.done():
                raise
            cancelled = True
    if cancelled:
        raise asyncio.CancelledError
    return result


def related_query(exchange: Exchange) -> str:
    """The text whose nearest memories the extractor sees: the newest user turns."""
    lines = conversation_lines(exchange)
    user = [line["content"] for line in lines if line["role"] == "user"]
    text = "\n".join(user or [line["content"] for line in lines])
    return text[-RELATED_QUERY_CHARS:]


# Opening again after the embedder or the disk failed at start-up: first
# wait, then doubling up to the longest (seconds).
OPEN_RETRY_FIRST = 1.0
OPEN_RETRY_MAX = 60.0


async def open_when_possible(
    open_once: Callable[[], Awaitable[T]], *, first_delay: float = OPEN_RETRY_FIRST
) -> T | None:
    """Call `open_once` until it succeeds, while it fails for a reason that
    passes (the embedder unreachable, an I/O error). Any other error is a
    configuration to fix, not to wait for: logged, and None."""
    delay = first_delay
    while True:
        await asyncio.sleep(delay)
        try:
            result = await open_once()
        except (EmbedderError, OSError) as exc:
            delay = min(delay * 2, OPEN_RETRY_MAX)
            log.warning(
                "memory still unavailable (next try in %.0f s): %s: %s",
                delay,
                type(exc).__name__,
                str(exc)[:300],
            )
        except Exception:
            log.exception("memory cannot be opened")
            return None
        else:
            log.info("memory is available again")
            return result


class MemoryEngine:
    def __init__(
        self,
        config: MemoryConfig,
        *,
        store: MemoryStore,
        embedder: Embedder,
        owns_embedder: bool,
        spool: Spool,
        extractor: Extractor,
        maintenance_lock: FileLock | None = None,
        handoff: HandoffSender | None = None,
    ) -> None:
        self.config = config
        # Set when another process (the extraction process) runs the jobs and
        # the maintenance: this one spools, searches and hands over keys.
        self._handoff = handoff
        self.store = store
        self.spool = spool
        self.extractor = extractor
        self._embedder = embedder
        self._owns_embedder = owns_embedder
        # BYOK: user_id -> the key of their latest request. Process memory only.
        self._keys: dict[str, str] = {}
        self.workers = WorkerPool(
            spool, self._process, config.spool, users=self._claimable_users, erased=self._undo
        )
        self.maintenance = Maintenance(store, config.maintenance, maintenance_lock)
        self._closed = False

    @classmethod
    async def open(
        cls,
        config: MemoryConfig,
        data_dir: Path,
        *,
        default_base_url: str | None = None,
        http_client: httpx.AsyncClient | None = None,
        embedder: Embedder | None = None,
        handoff: HandoffSender | None = None,
    ) -> MemoryEngine:
        """Open (or create) the store and the spool under `data_dir`. Call `start()` next.

        With `handoff`, spooled jobs are processed by the process at its other
        end (`receive` there), not here."""
        data_dir = Path(data_dir)
        owns_embedder = embedder is None
        if embedder is None:
            embedder = create_embedder(config.embedder, default_base_url=default_base_url)
        store: MemoryStore | None = None
        try:
            await asyncio.to_thread(data_dir.mkdir, parents=True, exist_ok=True)
            # Several gateway processes may start at once on one directory:
            # creating tables, indices and the spool's schema is done by one at a time.
            async with locked(data_dir / OPEN_LOCK):
                store = await MemoryStore.open(data_dir / STORE_DIR, embedder, config)
                spool = await Spool.open(
                    data_dir / SPOOL_FILE, lease_seconds=config.spool.lease_seconds
                )
        except BaseException:
            if store is not None:
                await store.close()
            if owns_embedder:
                await embedder.close()
            raise
        extractor = Extractor(config, default_base_url=default_base_url, http_client=http_client)
        return cls(
            config,
            store=store,
            embedder=embedder,
            owns_embedder=owns_embedder,
            spool=spool,
            extractor=extractor,
            maintenance_lock=FileLock(data_dir / MAINTENANCE_LOCK),
            handoff=handoff,
        )

    async def start(self) -> None:
        """Start the spool workers and background maintenance (unless another
        process runs them: see `open`)."""
        if self._handoff is None:
            await asyncio.to_thread(self.extractor.prepare)
            self.workers.start()
            self.maintenance.start()

    async def close(self) -> None:
        """Stop workers (running jobs go back to the queue), then close everything."""
        if self._closed:
            return
        self._closed = True
        await self.workers.stop()
        await self.maintenance.stop()
        await self.extractor.close()
        await self.spool.close()
        await self.store.close()
        if self._owns_embedder:
            await self._embedder.close()

    async def __aenter__(self) -> MemoryEngine:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def ready(self) -> bool:
        if self._closed or not await self.store.ready():
            return False
        try:
            await self.spool.unfinished()
        except Exception:
            log.exception("spool is not ready")
            return False
        return True

    # -- keys (BYOK) ---------------------------------------------------------

    def provide_key(self, user_id: str, api_key: str | None) -> None:
        """Remember the key of this user's latest request for their extraction jobs."""
        if not api_key or self.config.llm.api_key:
            return
        known = self._keys.get(user_id)
        self._keys[user_id] = api_key
        if known == api_key:
            return
        if self._handoff is not None:
            self._handoff.send(user_id, api_key)
        elif known is None:
            self.workers.notify()

    def receive(
        self,
        user_id: str | None,
        api_key: str | None,
        text: str | None = None,
        vector: np.ndarray | None = None,
    ) -> None:
        """A message from a serving process (memory/handoff.py): a user's key,
        the embedding of an exchange's turn, and jobs that may be claimable now."""
        if user_id is not None and api_key:
            self.provide_key(user_id, api_key)
        if text and vector is not None:
            self.store.expect_vector(text, vector)
        self.workers.notify()

    def _wake(
        self,
        user_id: str | None = None,
        api_key: str | None = None,
        exchange: Exchange | None = None,
    ) -> None:
        """Jobs may be claimable: wake the workers, here or in the extraction
        process. That one also gets the embedding of the exchange's turn when
        this process's search computed it (for `related`)."""
        if self._handoff is None:
            self.workers.notify()
            return
        needed = api_key if api_key and not self.config.llm.api_key else None
        embedded = None
        if exchange is not None:
            text = related_query(exchange)
            vector = self.store.searched_vector(exchange.scope, text) if text else None
            embedded = (text, vector) if vector is not None else None
        self._handoff.send(user_id, needed, embedded)

    def _claimable_users(self) -> list[str] | None:
        return None if self.config.llm.api_key else list(self._keys)

    async def extraction_lag(self) -> float:
        """How long the oldest job this engine could run now has waited
        (seconds): a job waiting for its user's key is not behind, it is
        blocked until that user's next request."""
        return await self.spool.lag(users=self._claimable_users())

    # -- writing through the spool -------------------------------------------

    async def record_exchange(self, exchange: Exchange, *, api_key: str | None = None) -> str:
        """Queue a finished exchange for extraction; returns once it is durable."""
        if self.config.redaction.enabled:
            exchange = redact_exchange(exchange)
        job_id = await self.spool.enqueue(exchange)
        self.provide_key(exchange.scope.user_id, api_key)
        # The key travels with every wake-up: an extraction process that
        # restarted since learns it back from the user's next exchange.
        self._wake(exchange.scope.user_id, api_key, exchange)
        return job_id

    async def add(
        self,
        scope: Scope,
        *,
        text: str | None = None,
        messages: list[dict[str, Any]] | None = None,
        infer: bool = True,
        metadata: dict[str, Any] | None = None,
        api_key: str | None = None,
    ) -> AddResult:
        """Add memories: verbatim (`infer=False`) or by extraction through the spool.

        `metadata` goes on every memory added: the verbatim ones, or the facts
        extraction adds (a fact that updates an existing memory keeps that
        memory's metadata).
        """
        if (text is None) == (messages is None):
            raise ValueError("give exactly one of `text` or `messages`")
        if messages is None:
            messages = [{"role": "user", "content": text}]
        if infer:
            exchange = Exchange(
                scope=scope,
                messages=messages,
                reply=None,
                at=datetime.now(UTC),
                metadata=metadata or None,
            )
            return AddResult(job_id=await self.record_exchange(exchange, api_key=api_key))
        texts = user_texts(messages)
        if not texts:
            raise ValueError("nothing to remember: no user text")
        memories = []
        for t in texts:
            t = self._redact(t)
            memories.append(await self.store.add(scope, t, metadata=metadata, actor="api"))
        return AddResult(memories=memories)

    # A timeout here is an answer (the last state), not an error: hence the parameter.
    async def wait(self, job_id: str, timeout: float = 30.0) -> JobInfo | None:  # noqa: ASYNC109
        """Wait until a job is done or failed (or `timeout`); its last known state."""
        deadline = time.monotonic() + timeout
        while True:
            info = await self.spool.get(job_id)
            remaining = deadline - time.monotonic()
            if info is None or info.state in ("done", "failed") or remaining <= 0:
                return info
            await self.workers.changed(min(remaining, 0.25))

    async def drain(self, timeout: float = 30.0) -> bool:  # noqa: ASYNC109
        """Wait until no job is pending or running; False on timeout."""
        deadline = time.monotonic() + timeout
        while True:
            if await self.spool.unfinished() == 0:
                return True
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            await self.workers.changed(min(remaining, 0.25))

    async def jobs(
        self, state: JobState | None = None, user_id: str | None = None, limit: int = 100
    ) -> list[JobInfo]:
        return await self.spool.jobs(state=state, user_id=user_id, limit=limit)

    async def retry_failed(self, user_id: str | None = None) -> int:
        n = await self.spool.retry_failed(user_id)
        if n:
            self._wake()
        return n

    # -- the job handler ------------------------------------------------------

    async def _process(self, job: Job) -> None:
        exchange = job.exchange
        scope = exchange.scope
        ops = job.decision
        # A decision made in this attempt was never applied before: no replay checks.
        fresh = ops is None
        if ops is None:
            ops = await self._decide(job)
            if not ops:
                # Nothing to apply (most chat turns): completing the job is the
                # only record needed. A crash before that asks the model again.
                return
            if not await self.spool.save_decision(job, ops):
                raise LeaseLost(job.id)
        if not ops:
            return
        if not await self.spool.owns(job):
            raise LeaseLost(job.id)
        await _uncancellable(
            self.store.apply(
                scope,
                ops,
                source=job.id,
                actor="extractor",
                at=exchange.at,
                fresh=fresh,
                metadata=exchange.metadata,
            )
        )

    async def _undo(self, job: Job) -> None:
        """Remove what an erased user's job wrote (`WorkerPool` tells when)."""
        await _uncancellable(self.store.forget_source(job.exchange.scope, job.id))

    async def _decide(self, job: Job) -> list[Operation]:
        key = self.config.llm.api_key or self._keys.get(job.user_id)
        if not key:
            raise Deferred(job.id)
        text = related_query(job.exchange)
        k = self.config.search.extraction_context
        existing = await self.store.related(job.exchange.scope, text, k) if text else []
        try:
            ops = await self.extractor.decide(job.exchange, existing, api_key=key)
        except ExtractionError as exc:
            # Belt and braces: an upstream error echoing the key must not reach the spool.
            raise type(exc)(exc.reason.replace(key, REDACTED)) from None
        return [
            msgspec.structs.replace(op, text=self._redact(op.text)) if op.text else op for op in ops
        ]

    def _redact(self, text: str) -> str:
        return redact(text) if self.config.redaction.enabled else text

    # -- reading and editing --------------------------------------------------

    async def search(
        self,
        scope: Scope,
        query: str,
        limit: int | None = None,
        *,
        min_score: float | None = None,
        include_superseded: bool = False,
    ) -> list[Hit]:
        return await self.store.search(
            scope, query, limit=limit, min_score=min_score, include_superseded=include_superseded
        )

    async def get(self, scope: Scope, memory_id: str) -> Memory | None:
        return await self.store.get(scope, memory_id)

    async def list(
        self, scope: Scope, *, limit: int = 100, offset: int = 0, include_superseded: bool = False
    ) -> builtins.list[Memory]:
        return await self.store.list(
            scope, limit=limit, offset=offset, include_superseded=include_superseded
        )

    async def update(
        self,
        scope: Scope,
        memory_id: str,
        *,
        text: str | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> Memory | None:
        if text is not None:
            text = self._redact(text)
        return await self.store.update(scope, memory_id, text=text, metadata=metadata)

    async def delete(self, scope: Scope, memory_id: str) -> bool:
        return await self.store.delete(scope, memory_id)

    async def delete_all(self, scope: Scope) -> int:
        """Forget a user (or one agent of theirs): memories, history and queued jobs."""
        await self.spool.delete_user(scope.user_id, scope.agent_id)
        # A job of theirs running here must not write after the erase.
        await self.workers.cancel_user(scope.user_id)
        if scope.agent_id is None:
            self._keys.pop(scope.user_id, None)
        return await self.store.delete_all(scope)

    async def history(self, scope: Scope, memory_id: str) -> builtins.list[HistoryEntry]:
        return await self.store.history(scope, memory_id)

    async def export(self, scope: Scope) -> builtins.list[str]:
        """Every memory of the scope as JSON lines (superseded ones included)."""
        return [_memory_encoder.encode(m).decode() for m in await self.store.export(scope)]

    async def import_lines(self, scope: Scope, lines: Iterable[str | bytes]) -> ImportResult:
        """Import JSON lines from `export` into `scope`'s user. A line that is
        not a memory rejects the whole import (`InvalidImport`); memories the
        store cannot hold are reported in the result with their line numbers
        (blank lines counted, as an editor shows them)."""
        memories: builtins.list[Memory] = []
        numbers: builtins.list[int] = []
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                m = _memory_decoder.decode(line)
            except msgspec.DecodeError as exc:
                raise InvalidImport(f"line {n}: {exc}") from None
            memories.append(msgspec.structs.replace(m, text=self._redact(m.text)))
            numbers.append(n)
        result = await self.store.import_memories(scope, memories)
        for issue in (*result.skipped, *result.failed):
            issue.line = numbers[issue.line - 1]
        return result

    async def users(self) -> builtins.list[tuple[str, int]]:
        return await self.store.users()

    async def stats(self) -> Stats:
        memories, users, spool = await asyncio.gather(
            self.store.count(), self.store.users(), self.spool.stats()
        )
        return Stats(memories=memories, users=len(users), spool=spool)
