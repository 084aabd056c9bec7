"""`MemoryEngine`: the one object the gateway talks to.

It wires the store, the embedder, the extractor, the spool and its workers.
Exchanges are redacted, then spooled durably, then acknowledged; workers turn
them into facts in the background (memory/job_handler.py). Which key a job
sends to the extraction endpoint is kept in memory/extraction_keys.py: with
no `memory.llm.api_key`, the key of the user's latest request, which the
gateway hands over with `provide_key`.

Reads (search, get, list, history, users) go to `engine.store` directly; what
is here is the wiring and the ways in that involve more than the store:
recording exchanges, adding with inference, erasing a user, import and export.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import httpx
import msgspec
import numpy as np

from memory.clipping import clip_exchange_texts
from memory.config import MemoryConfig, QueueConfig, StorageConfig
from memory.embedding import Embedder, create_embedder
from memory.errors import TRANSIENT, InvalidImport
from memory.extraction import CallGate, Extractor
from memory.extraction_keys import ExtractionKeys
from memory.extraction_state import STATE_FILE
from memory.extraction_status import ExtractionMonitor
from memory.handoff import HandoffSender
from memory.job_handler import JobHandler, related_query
from memory.locks import locked
from memory.maintenance import Maintenance
from memory.messages import user_texts
from memory.models import (
    Exchange,
    ExtractionStatus,
    ImportResult,
    Memory,
    Operation,
    Scope,
    Stats,
)
from memory.observer import NO_OBSERVER, Observer
from memory.redaction import redact, redact_exchange
from memory.spool import JobInfo, JobState
from memory.spools import ExclusiveLock, JobQueue, maintenance_lock, open_spool, opening
from memory.store import MemoryStore
from memory.workers import WorkerPool

log = logging.getLogger("memory.engine")
T = TypeVar("T")

# A recorded exchange keeps at most this many of its messages (the newest).
RECORD_MAX_MESSAGES = 64
STORE_DIR = "lancedb"
OPEN_LOCK = "open.lock"
MAINTENANCE_LOCK = "maintenance.lock"

_memory_encoder = msgspec.json.Encoder()
_memory_decoder = msgspec.json.Decoder(Memory)


class AddResult(msgspec.Struct, kw_only=True):
    """`add` either stored memories directly (infer=False) or queued a job."""

    memories: list[Memory] = msgspec.field(default_factory=list)
    job_id: str | None = None


def record_chars(config: MemoryConfig) -> int:
    """How many characters of each text of an exchange are recorded: more
    than the extraction prompt can hold (`context_tokens`, at 4 characters a
    token at most), so clipping loses nothing the model would see, while a
    20 MB paste costs redaction and the spool no more than a long message."""
    return max(4 * config.llm.context_tokens, 16_000)


# Opening again after the embedder or the disk failed at start-up: first
# wait, then doubling up to the longest (seconds).
OPEN_RETRY_FIRST = 1.0
OPEN_RETRY_MAX = 60.0


async def open_when_possible(
    open_once: Callable[[], Awaitable[T]], *, first_delay: float = OPEN_RETRY_FIRST
) -> T | None:
    """Call `open_once` until it succeeds, while it fails for a reason that
    passes (`memory.errors.TRANSIENT`: the embedder unreachable, an I/O
    error). Any other error is a configuration to fix, not to wait for:
    logged, and None."""
    delay = first_delay
    while True:
        await asyncio.sleep(delay)
        try:
            result = await open_once()
        except TRANSIENT as exc:
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
        spool: JobQueue,
        extractor: Extractor,
        maintenance_lock: ExclusiveLock | None = None,
        handoff: HandoffSender | None = None,
        extraction_key: str | None = None,
        key_source: str | None = None,
        state_path: Path | None = None,
        observer: Observer = NO_OBSERVER,
    ) -> None:
        self.config = config
        # Marking the jobs that wait for a key (`receive`).
        self._marking: asyncio.Task[None] | None = None
        self._probe: asyncio.Task[None] | None = None
        # Set when another process (the extraction process) runs the jobs and
        # the maintenance: this one spools, searches and hands over keys.
        self._handoff = handoff
        self.store = store
        self.spool = spool
        self.extractor = extractor
        self._embedder = embedder
        self._owns_embedder = owns_embedder
        # The key configured for the extraction endpoint (memory.llm.api_key,
        # or the key of the upstream at that address), or each user's own.
        self.keys = ExtractionKeys(
            config.llm.api_key or extraction_key,
            extractor,
            handoff=handoff,
            wake=lambda: self.workers.notify(),
        )
        self.handler = JobHandler(
            config,
            store=store,
            spool=spool,
            extractor=extractor,
            keys=self.keys,
            redact=self._redact,
            observer=observer,
        )
        self.workers = WorkerPool(
            spool,
            self.handler.process,
            config.spool,
            users=self.keys.claimable_users,
            erased=self.handler.undo,
        )
        self.maintenance = Maintenance(store, config.maintenance, maintenance_lock)
        # How extraction is going (stats, the chat status header).
        self.monitor = ExtractionMonitor(
            config, spool, extractor, self.keys, key_source=key_source, state_path=state_path
        )
        self._closed = False

    @classmethod
    async def open(
        cls,
        config: MemoryConfig,
        data_dir: Path,
        *,
        storage: StorageConfig | None = None,
        queue: QueueConfig | None = None,
        default_base_url: str | None = None,
        http_client: httpx.AsyncClient | None = None,
        embedder: Embedder | None = None,
        handoff: HandoffSender | None = None,
        extraction_key: str | None = None,
        key_source: str | None = None,
        call_gate: CallGate | None = None,
        observer: Observer = NO_OBSERVER,
    ) -> MemoryEngine:
        """Open (or create) the store and the spool under `data_dir`. Call `start()` next.

        With `handoff`, spooled jobs are processed by the process at its other
        end (`receive` there), not here. `extraction_key` is the key configured
        for the extraction endpoint (`key_source` says where it came from);
        `call_gate` is entered around each extraction call (the gateway
        lets chats to a one-slot local server go first); `observer` hears of
        extraction's token usage and decisions (the gateway's metrics)."""
        data_dir = Path(data_dir)
        storage = storage or StorageConfig()
        queue = queue or QueueConfig()
        owns_embedder = embedder is None
        if embedder is None:
            embedder = create_embedder(config.embedder, default_base_url=default_base_url)
        store: MemoryStore | None = None
        try:
            await asyncio.to_thread(data_dir.mkdir, parents=True, exist_ok=True)
            # Several gateway processes may start at once on one directory, and
            # replicas on one shared store: creating tables, indices and the
            # spool's schema is done by one at a time.
            async with locked(data_dir / OPEN_LOCK), opening(queue):
                store = await MemoryStore.open(
                    data_dir / STORE_DIR, embedder, config, storage=storage, queue_url=queue.url
                )
                spool = await open_spool(queue, data_dir, lease_seconds=config.spool.lease_seconds)
        except BaseException:
            if store is not None:
                await store.close()
            if owns_embedder:
                await embedder.close()
            raise
        state_path = data_dir / STATE_FILE
        extractor = Extractor(
            config,
            default_base_url=default_base_url,
            http_client=http_client,
            api_key=config.llm.api_key or extraction_key,
            state_path=state_path,
            call_gate=call_gate,
            observer=observer,
        )
        return cls(
            config,
            store=store,
            embedder=embedder,
            owns_embedder=owns_embedder,
            spool=spool,
            extractor=extractor,
            # One maintainer among the processes sharing the queue: on this
            # machine (a file lock), or every replica's (PostgreSQL's lock).
            maintenance_lock=maintenance_lock(spool, data_dir / MAINTENANCE_LOCK),
            handoff=handoff,
            extraction_key=extraction_key,
            key_source=key_source,
            state_path=state_path,
            observer=observer,
        )

    async def start(self) -> None:
        """Start the spool workers and background maintenance (unless another
        process runs them: see `open`)."""
        if self._handoff is None:
            await asyncio.to_thread(self.extractor.prepare)
            self.workers.start()
            self.maintenance.start()
            self._probe = asyncio.create_task(self._probe_endpoint(), name="extraction-probe")

    async def _probe_endpoint(self) -> None:
        """Ask the extraction endpoint which models it serves and whether it
        needs a key, off the start-up path; jobs that can run then are woken,
        and the others are marked as waiting for a key."""
        delay = OPEN_RETRY_FIRST
        while True:
            try:
                probe = await self.extractor.probe()
                if self.keys.needs_user_keys():
                    await self.spool.mark_waiting("no_key", except_users=self.keys.users())
            except Exception:
                log.exception("probing the extraction endpoint failed")
                return
            self.workers.notify()
            if probe.reachable:
                return
            # Down or not started yet (a local server starting beside the
            # gateway): ask again, so its model list is used once it is up.
            await asyncio.sleep(delay)
            delay = min(delay * 2, OPEN_RETRY_MAX)

    async def close(self) -> None:
        """Stop workers (running jobs go back to the queue), then close everything."""
        if self._closed:
            return
        self._closed = True
        await self.monitor.close()
        for task in (self._probe, self._marking):
            if task is not None:
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task
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
        """Remember the key of this user's latest request for their extraction
        jobs. The caller vouches that this key may go to the extraction
        endpoint (it was sent to that same upstream)."""
        self.keys.provide(user_id, api_key)

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
        if user_id is not None and not self.keys.knows(user_id) and self.keys.needs_user_keys():
            # Its new job waits for a key: say so in its `reason`.
            self._mark_waiting_soon()
        self.workers.notify()

    def _mark_waiting_soon(self) -> None:
        if self._closed or (self._marking is not None and not self._marking.done()):
            return

        async def mark() -> None:
            # One write for the jobs of a burst of exchanges.
            await asyncio.sleep(0.5)
            try:
                await self.spool.mark_waiting("no_key", except_users=self.keys.users())
            except Exception:
                log.exception("marking the jobs that wait for a key failed")

        self._marking = asyncio.create_task(mark(), name="mark-no-key")

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
        needed = self.keys.to_hand_over(api_key)
        embedded = None
        if exchange is not None:
            text = related_query(exchange)
            vector = self.store.searched_vector(exchange.scope, text) if text else None
            embedded = (text, vector) if vector is not None else None
        self._handoff.send(user_id, needed, embedded)

    async def extraction_lag(self) -> float:
        """How long the oldest job this engine could run now has waited
        (seconds): a job waiting for its user's key is not behind, it is
        blocked until that user's next request."""
        return await self.spool.lag(users=self.keys.claimable_users())

    # -- writing through the spool -------------------------------------------

    async def record_exchange(self, exchange: Exchange, *, api_key: str | None = None) -> str:
        """Queue a finished exchange for extraction; returns once it is durable."""
        if len(exchange.messages) > RECORD_MAX_MESSAGES:
            exchange = msgspec.structs.replace(
                exchange, messages=exchange.messages[-RECORD_MAX_MESSAGES:]
            )
        exchange = clip_exchange_texts(exchange, record_chars(self.config))
        if self.config.redaction.enabled:
            # Bounded by the clipping above, but still milliseconds of regular
            # expressions for a long message: off the event loop.
            exchange = await asyncio.to_thread(redact_exchange, exchange)
        user = exchange.scope.user_id
        waits = self.keys.needs_user_keys() and not api_key and not self.keys.knows(user)
        job_id = await self.spool.enqueue(exchange, reason="no_key" if waits else None)
        # The wake-up below hands the key over (and wakes the workers).
        self.keys.provide(user, api_key, hand_over=False)
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

    async def job(self, job_id: str) -> JobInfo | None:
        return await self.spool.get(job_id)

    async def job_operations(self, job_id: str) -> builtins.list[Operation] | None:
        """What a done job applied (None: unknown job)."""
        return await self.spool.decision(job_id)

    async def retry_failed(self, user_id: str | None = None) -> int:
        n = await self.spool.retry_failed(user_id)
        if n:
            self._wake()
        return n

    def _redact(self, text: str) -> str:
        return redact(text) if self.config.redaction.enabled else text

    # -- editing (reads go to `store` directly) -------------------------------

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

    async def delete_all(self, scope: Scope) -> int:
        """Forget a user (or one agent of theirs): memories, history and queued jobs."""
        await self.spool.delete_user(scope.user_id, scope.agent_id)
        # A job of theirs running here must not write after the erase.
        await self.workers.cancel_user(scope.user_id)
        if scope.agent_id is None:
            self.keys.forget(scope.user_id)
        return await self.store.delete_all(scope)

    async def export(self, scope: Scope) -> builtins.list[str]:
        """Every memory of the scope as JSON lines (superseded ones included)."""
        return [_memory_encoder.encode(m).decode() for m in await self.store.export(scope)]

    async def import_lines(
        self, scope: Scope, lines: Iterable[str | bytes], *, keep_ids: bool = False
    ) -> ImportResult:
        """Import JSON lines from `export` into `scope`'s user (`keep_ids`: see
        `MemoryStore.import_memories`). A line that is not a memory rejects the
        whole import (`InvalidImport`); memories the store cannot hold are
        reported in the result with their line numbers (blank lines counted,
        as an editor shows them)."""
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
        result = await self.store.import_memories(scope, memories, keep_ids=keep_ids)
        for issue in (*result.skipped, *result.failed):
            issue.line = numbers[issue.line - 1]
        return result

    async def stats(self) -> Stats:
        memories, users, spool, extraction = await asyncio.gather(
            self.store.count(), self.store.users(), self.spool.stats(), self.extraction_status()
        )
        return Stats(memories=memories, users=len(users), spool=spool, extraction=extraction)

    async def extraction_status(self) -> ExtractionStatus:
        return await self.monitor.status()

    def extraction_failing(self) -> bool:
        return self.monitor.failing()
