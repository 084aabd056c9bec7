"""The grouped apply queue: where extraction jobs' decisions are written.

`apply` embeds a job's new texts, queues it and waits. One drainer, under
the store's writer lock, takes at most one job per user at a time (a user's
jobs stay in order) and writes up to `_APPLY_GROUP` of them together: one
read of what is stored, each job's `Plan.decide` (memory/store/plan.py),
then one write of rows and one of history for the whole group (LanceDB
makes a version and a fragment per write). A group that fails is retried
job by job, so one bad job does not fail its neighbours.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import msgspec
import numpy as np

from memory.filters import scope_filter
from memory.models import Actor, HistoryEntry, Operation, Scope
from memory.rows import to_entry, utc
from memory.store.plan import Plan, op_texts
from memory.store.tables import Tables

# Jobs written together by the group writer.
_APPLY_GROUP = 64


class ApplyRequest:
    """One job's decisions waiting for the group writer."""

    def __init__(
        self,
        scope: Scope,
        ops: Sequence[Operation],
        source: str,
        actor: Actor,
        at: datetime,
        fresh: bool,
        vectors: dict[str, np.ndarray],
        metadata: str = "{}",
    ) -> None:
        self.scope = scope
        self.metadata = metadata  # JSON, for the rows its ADDs insert
        self.ops = ops
        self.source = source
        self.actor = actor
        self.at = at
        self.fresh = fresh
        self.vectors = vectors
        self.future: asyncio.Future[list[HistoryEntry]] = asyncio.get_running_loop().create_future()


class ApplyQueue(Tables):
    """Extraction jobs, grouped and written by one drainer."""

    # Extraction jobs waiting for the group writer, and the drainer writing them.
    _applies: list[ApplyRequest]
    _applier: asyncio.Future[None] | None

    async def apply(
        self,
        scope: Scope,
        ops: Sequence[Operation],
        *,
        source: str,
        actor: Actor,
        at: datetime,
        fresh: bool = False,
        metadata: dict[str, Any] | None = None,
    ) -> list[HistoryEntry]:
        """Apply one extraction job's decisions; replaying the same job is a no-op.

        The i-th operation's new row and history entry have ids derived from
        (source, i), and each step checks what is already there, so a job
        interrupted anywhere and replayed ends in the same state. Ids outside
        `scope` are ignored. `fresh` promises that nothing of `source` was ever
        written (its decision was made in this attempt), which skips the
        replay checks.

        Concurrent calls are grouped: one write of rows and one of history for
        the whole group (LanceDB makes a version and a fragment per write).
        """
        texts = list(dict.fromkeys(op_texts(ops).values()))
        # Embedded before queueing, outside the lock: the embedder batches
        # concurrent jobs, and the writer never waits on it.
        vectors = dict(zip(texts, await self._embed(texts), strict=True)) if texts else {}
        request = ApplyRequest(
            scope,
            ops,
            source,
            actor,
            utc(at),
            fresh,
            vectors,
            msgspec.json.encode(metadata or {}).decode(),
        )
        self._applies.append(request)
        if self._applier is None or self._applier.done():
            self._applier = asyncio.ensure_future(self._drain_applies())
        return await asyncio.shield(request.future)

    async def _drain_applies(self) -> None:
        async with self._lock:
            while self._applies:
                group, rest, users = [], [], set()
                for request in self._applies:
                    # One job per user and group: a user's jobs stay in order.
                    if request.scope.user_id in users or request.future.done():
                        rest.append(request)
                    else:
                        users.add(request.scope.user_id)
                        group.append(request)
                self._applies = [r for r in rest if not r.future.done()]
                for start in range(0, len(group), _APPLY_GROUP):
                    chunk = group[start : start + _APPLY_GROUP]
                    await self._apply_chunk(chunk)

    async def _apply_chunk(self, chunk: list[ApplyRequest]) -> None:
        try:
            results = await self._apply_group(chunk)
        except Exception as exc:
            if len(chunk) == 1:
                if not chunk[0].future.done():
                    chunk[0].future.set_exception(exc)
                return
            # One bad job must not fail its neighbours: each again, alone. Part
            # of the group may be written, so no job counts as fresh any more.
            for request in chunk:
                request.fresh = False
                await self._apply_chunk([request])
            return
        for request, entries in zip(chunk, results, strict=True):
            if not request.future.done():
                request.future.set_result(entries)

    async def _apply_group(self, group: list[ApplyRequest]) -> list[list[HistoryEntry]]:
        plans = [Plan(r) for r in group]
        # What is already stored, read once for the whole group.
        id_filters = [
            scope_filter(p.request.scope, ids=p.lookup_ids) for p in plans if p.lookup_ids
        ]
        # Active rows with the new texts' hashes: from the search cache when
        # the scope is cached (brought up to other processes' writes first),
        # else from LanceDB.
        cached = await self._cached_hashes(plans)
        hash_filters = [
            scope_filter(p.request.scope, hashes=p.hashes, active_only=True)
            for p in plans
            if p.hashes and id(p) not in cached
        ]
        entry_filters = [
            scope_filter(p.request.scope, ids=list(p.entry_ids.values()))
            for p in plans
            if not p.request.fresh and p.entry_ids
        ]
        by_id = await self._rows_any(id_filters, vectors=True)
        by_hash = await self._rows_any(hash_filters)
        recorded = await self._history_ids(entry_filters)
        inserts: dict[str, dict[str, Any]] = {}
        supersede: dict[str, dict[str, Any]] = {}
        entries: list[list[dict[str, Any]]] = []
        deletes: list[tuple[Scope, list[str]]] = []
        missing: list[tuple[dict[str, Any], str]] = []
        for plan in plans:
            scope = plan.request.scope
            existing = {r["id"]: r for r in by_id if scope.sees(r)}
            wanted = set(plan.hashes)
            active = cached.get(id(plan))
            if active is None:
                active = {
                    r["hash"]: r["id"] for r in by_hash if r["hash"] in wanted and scope.sees(r)
                }
            plan.decide(existing, active, recorded)
            for row in plan.inserts.values():
                vector = plan.request.vectors.get(row["text"])
                if vector is None:
                    missing.append((row, row["text"]))
                row["vector"] = vector
            inserts.update(plan.inserts)
            supersede.update(plan.supersede)
            entries.append(plan.entries)
            if plan.deletes:
                deletes.append((scope, plan.deletes))
        if missing:
            for (row, _), vec in zip(
                missing, await self._embed([t for _, t in missing]), strict=True
            ):
                row["vector"] = vec
        # Order matters for replay: rows, then supersession, then history, then deletes.
        await self._insert(list(inserts.values()))
        await self._upsert(list(supersede.values()))
        await self._record([e for job in entries for e in job])
        for scope, ids in deletes:
            await self._remove(scope, ids)
        return [[to_entry(e) for e in job] for job in entries]

    async def _cached_hashes(
        self, plans: Sequence[Plan[ApplyRequest]]
    ) -> dict[int, dict[str, str]]:
        """For each plan (by `id`) whose scope is cached: hash -> id of the
        scope's active rows with its texts' hashes."""
        if self._cache is None or not any(p.hashes for p in plans):
            return {}
        if not await self._check_version():
            return {}  # not sure the cache has every row: ask LanceDB
        out: dict[int, dict[str, str]] = {}
        for plan in plans:
            scope = plan.request.scope
            entry = self._cache.peek(scope.key)
            if plan.hashes and entry is not None:
                found = entry.with_hashes(plan.hashes)
                if found is not None:
                    out[id(plan)] = found
        return out
