"""Where a request gets its memories: `search` and `related`.

Cosine similarity and n-gram full-text candidates come from the scope cache
(`scope_index`, scored on the store's two scoring threads) or from LanceDB,
and are fused (`fusion`). `related` is the extraction's context: the
nearest active memories, from the recent-search memo when it can.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import numpy as np

from memory.filters import scope_filter
from memory.models import Hit, Memory, Scope
from memory.rows import MEMORY_COLUMNS, to_memory
from memory.search.fusion import boosted_similarity, reciprocal_rank_fusion
from memory.search.recent import RecentSearches
from memory.search.scope_index import Candidates, ScopeIndex

log = logging.getLogger(__name__)

T = TypeVar("T")

# Full-text queries are cut to this many characters: n-gram queries grow with length.
_FTS_QUERY_CHARS = 256
# Cached scopes smaller than this are scored on the event loop (a thread hop costs more).
_INLINE_ROWS = 2048


class Searcher(RecentSearches):
    """Search and `related`, over the cache or LanceDB."""

    async def search(
        self,
        scope: Scope,
        query: str,
        *,
        limit: int | None = None,
        min_score: float | None = None,
        include_superseded: bool = False,
    ) -> list[Hit]:
        """The memories of `scope` most relevant to `query`, best first.

        Cosine similarity and full-text (BM25 over 1-3 character n-grams)
        candidates are fused (`SearchConfig.fusion`); a hit must still reach
        `min_score` cosine similarity. Active memories come from the scope
        cache when enabled, else from LanceDB (which also scans fresh rows
        not yet in its full-text index).
        """
        search = self._config.search
        limit = search.limit if limit is None else limit
        min_score = search.min_score if min_score is None else min_score
        if limit <= 0:
            return []
        candidates = max(limit * 3, 20)
        fts_text = query.strip()[:_FTS_QUERY_CHARS] if search.hybrid else ""
        if self._cache is not None and not include_superseded:
            token = self._cache.token(scope.user_id)
            found, entry, vector = await self._cached_candidates(scope, query, fts_text, candidates)
            complete = len(found.by_vector) == len(entry)
            self._remember(scope, query, token, found, vector, complete=complete)
        else:
            vector = (await self._embed([query]))[0]
            where = scope_filter(scope, active_only=not include_superseded)
            found = await self._lance_candidates(vector, fts_text, where, candidates)
        return self._fuse(found, limit=limit, min_score=min_score)

    def _fuse(self, found: Candidates, *, limit: int, min_score: float) -> list[Hit]:
        search = self._config.search
        similarity: dict[str, float] = {}
        rows: dict[str, Mapping[str, Any]] = {}
        for row, sim in found.by_vector:
            similarity[row["id"]] = sim
            rows[row["id"]] = row
        for row, sim, _ in found.by_text:
            if row["id"] not in similarity:
                similarity[row["id"]] = sim
                rows[row["id"]] = row
        if not found.by_text:
            fused = dict(similarity)
        elif search.fusion == "rrf":
            fused = reciprocal_rank_fusion(
                [[r["id"] for r, _ in found.by_vector], [r["id"] for r, _, _ in found.by_text]]
            )
        else:
            bm25 = {r["id"]: score for r, _, score in found.by_text}
            fused = boosted_similarity(similarity, bm25, weight=search.text_weight)
        ranked = sorted(
            (i for i in fused if similarity[i] >= min_score), key=lambda i: (-fused[i], i)
        )
        ranked = ranked[:limit]
        return [
            Hit(memory=to_memory(rows[i]), score=fused[i], similarity=similarity[i]) for i in ranked
        ]

    async def _cached_candidates(
        self, scope: Scope, query: str, text: str, k: int
    ) -> tuple[Candidates, ScopeIndex, np.ndarray]:
        """Both top lists from the scope cache. For a large scope, BM25 and the
        vector product run on two threads at once (the text side needs no
        embedding, so it also overlaps embedding a new query): on an idle core
        that is ~1 ms less per request, and under load no more CPU."""
        loading = asyncio.ensure_future(self._scope_index(scope))

        async def by_vector() -> tuple[ScopeIndex, np.ndarray, Any]:
            vector = (await self._embed([query]))[0]
            entry = await loading
            if len(entry) < _INLINE_ROWS:
                return entry, vector, None
            return entry, vector, await self._score(self._scorer, entry.vector_top, vector, k)

        async def by_text() -> Any:
            entry = await loading
            if not text or len(entry) < _INLINE_ROWS:
                return None
            return await self._score(self._text_scorer, entry.text_top, text, k)

        (entry, vector, vector_top), text_top = await asyncio.gather(by_vector(), by_text())
        if vector_top is None:  # small scope: a thread hop costs more than scoring it
            return entry.candidates(vector, text, k), entry, vector
        return entry.assemble(*vector_top, text_top), entry, vector

    async def _lance_candidates(
        self, vector: np.ndarray, text: str, where: str, limit: int
    ) -> Candidates:
        vector_query = (
            self._memories.query()
            .nearest_to(vector)
            .distance_type("cosine")
            .where(where)
            .select([*MEMORY_COLUMNS, "_distance"])
            .limit(limit)
        )
        if text:
            by_vector, by_text = await asyncio.gather(
                vector_query.to_list(), self._text_candidates(text, where, limit)
            )
        else:
            by_vector, by_text = await vector_query.to_list(), []
        return Candidates(
            [(r, 1.0 - float(r["_distance"])) for r in by_vector],
            [
                (r, float(np.asarray(r["vector"], dtype=np.float32) @ vector), float(r["_score"]))
                for r in by_text
            ],
        )

    async def _text_candidates(self, text: str, where: str, limit: int) -> list[dict[str, Any]]:
        try:
            return (
                await self._memories.query()
                .nearest_to_text(text, columns="text")
                .where(where)
                .select([*MEMORY_COLUMNS, "vector", "_score"])
                .limit(limit)
                .to_list()
            )
        except Exception:
            # Full text is a booster: a failing FTS query must not fail retrieval.
            log.exception("full-text search failed; using vector results only")
            return []

    async def related(self, scope: Scope, text: str, k: int) -> list[Memory]:
        """The `k` active memories closest to `text` (the extractor's context).

        The request that produced an exchange searched with its user's turn a
        moment before its extraction asks for this: the search's cosine top
        list answers it, with no embedding and no scan, while the scope is
        unchanged.
        """
        if k <= 0:
            return []
        handed = self._handed.get(text)
        if self._cache is not None:
            rows = await self._recently_found(scope, text, k)
            if rows is None:
                embedded, entry = await asyncio.gather(
                    self._embed_unless(handed, text), self._scope_index(scope)
                )
                if len(entry) < _INLINE_ROWS:
                    found = entry.nearest(embedded, k)
                else:
                    # Background work: not on the scoring thread, where requests' searches queue.
                    found = await asyncio.to_thread(entry.nearest, embedded, k)
                rows = [row for row, _ in found]
            return [to_memory(row) for row in rows]
        vector = await self._embed_unless(handed, text)
        rows = (
            await self._memories.query()
            .nearest_to(vector)
            .distance_type("cosine")
            .where(scope_filter(scope, active_only=True))
            .select([*MEMORY_COLUMNS, "_distance"])
            .limit(k)
            .to_list()
        )
        return [to_memory(r) for r in rows]

    async def _embed_unless(self, vector: np.ndarray | None, text: str) -> np.ndarray:
        return vector if vector is not None else (await self._embed([text]))[0]

    # ---------- the scoring threads ----------

    async def _score(self, scorer: ThreadPoolExecutor, fn: Callable[..., T], *args: Any) -> T:
        """Score a request's search (numpy, GIL mostly released) on one of the
        store's two scoring threads, vectors or text.

        Concurrent searches queue for them rather than each taking a thread of
        the default pool: on 2 cores, six scans of the same 20 MiB matrix at
        once thrash the caches and each became ~2.5x slower than one alone.
        Background work (the extractor's `related`) stays off them, so requests
        never queue behind it.
        """
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(scorer, functools.partial(fn, *args))
