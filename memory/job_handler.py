"""Where an exchange becomes operations: the spool workers' job handler.

`process` asks the extractor what to remember from a job's exchange (with the
memories nearest to its newest user turns), saves that decision with the job,
then applies it to the store. A job that crashed after its decision was saved
is re-applied from that decision without asking the model again; applying is
idempotent. `undo` removes what an erased user's job wrote.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, TypeVar

import msgspec

from memory.clipping import search_query
from memory.extraction import ExtractionError
from memory.models import Exchange, Operation
from memory.observer import NO_OBSERVER, Observer
from memory.prompts import conversation_lines
from memory.redaction import REDACTED
from memory.workers import Deferred, LeaseLost

if TYPE_CHECKING:
    from memory.config import MemoryConfig
    from memory.extraction import Extractor
    from memory.extraction_keys import ExtractionKeys
    from memory.spool import Job
    from memory.spools import JobQueue
    from memory.store import MemoryStore

log = logging.getLogger("memory.job_handler")

T = TypeVar("T")


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
    """The text whose nearest memories the extractor sees: the newest user
    turns, cut as a chat's own memory search cuts its query (`search_query`),
    so the search a chat made can serve its exchange's job too. The facts to
    update are about what the user just said, not about the app's system
    prompt or the reply."""
    lines = conversation_lines(exchange)
    user = [line["content"] for line in lines if line["role"] == "user"]
    return search_query("\n".join(user or [line["content"] for line in lines]))


class JobHandler:
    """Turns a claimed job into operations applied to the store."""

    def __init__(
        self,
        config: MemoryConfig,
        *,
        store: MemoryStore,
        spool: JobQueue,
        extractor: Extractor,
        keys: ExtractionKeys,
        redact: Callable[[str], str],
        observer: Observer = NO_OBSERVER,
    ) -> None:
        self._config = config
        self._observer = observer
        self._store = store
        self._spool = spool
        self._extractor = extractor
        self._keys = keys
        # Redacts a text the way the engine does (a no-op when redaction is off).
        self._redact = redact

    async def process(self, job: Job) -> None:
        exchange = job.exchange
        scope = exchange.scope
        ops = job.decision
        # A decision made in this attempt was never applied before: no replay checks.
        fresh = ops is None
        if ops is None:
            ops = await self.decide(job)
            if not ops:
                # Nothing to apply (most chat turns): completing the job is the
                # only record needed. A crash before that asks the model again.
                self._observer.operations_applied(ops)
                log.debug(
                    "spool job %s of user %r: nothing to remember", job.id, scope.user_id[:64]
                )
                return
            if not await self._spool.save_decision(job, ops):
                raise LeaseLost(job.id)
        if not ops:
            return
        if not await self._spool.owns(job):
            raise LeaseLost(job.id)
        try:
            await _uncancellable(
                self._store.apply(
                    scope,
                    ops,
                    source=job.id,
                    actor="extractor",
                    at=exchange.at,
                    fresh=fresh,
                    metadata=exchange.metadata,
                )
            )
        except Exception as exc:
            raise self._store.outage(exc) from exc
        self._observer.operations_applied(ops)
        if log.isEnabledFor(logging.DEBUG):
            # Operations and ids only: never a memory's text.
            log.debug(
                "spool job %s of user %r applied: %s",
                job.id,
                scope.user_id[:64],
                ", ".join(f"{op.op} {op.memory_id or '(new)'}" for op in ops),
            )

    async def undo(self, job: Job) -> None:
        """Remove what an erased user's job wrote (`WorkerPool` tells when)."""
        await _uncancellable(self._store.forget_source(job.exchange.scope, job.id))

    async def decide(self, job: Job) -> list[Operation]:
        """Ask the extractor what to remember from the job's exchange."""
        key = self._keys.key_for(job.user_id)
        if not key and self._keys.needs_user_keys():
            raise Deferred(job.id, "no_key")
        text = related_query(job.exchange)
        k = self._config.search.extraction_context
        try:
            existing = await self._store.related(job.exchange.scope, text, k) if text else []
        except Exception as exc:
            raise self._store.outage(exc) from exc
        try:
            ops = await self._extractor.decide(job.exchange, existing, api_key=key)
        except ExtractionError as exc:
            if exc.category == "no_key":
                raise Deferred(job.id, "no_key") from None
            # Belt and braces: an upstream error echoing the key must not reach the spool.
            if key:
                exc.reason = exc.reason.replace(key, REDACTED)
                exc.args = (exc.reason,)
            raise
        return [
            msgspec.structs.replace(op, text=self._redact(op.text)) if op.text else op for op in ops
        ]
