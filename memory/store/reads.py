"""Reading the memories and history tables, and embedding texts.

The lowest of the store's own layers (above the search ones, whose
`_rows_by_ids` and `_embed` it provides). Every read here is narrowed by
the filter it is given, built by `memory.filters`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from memory.embedding import EmbedderError
from memory.filters import scope_filter
from memory.models import Scope
from memory.rows import MEMORY_COLUMNS
from memory.search.searcher import Searcher

_IN_CHUNK = 500
# Scope filters OR-ed in one query (a group of jobs reads what it needs at once).
_OR_CHUNK = 64


def _any_of(filters: Sequence[str]) -> list[str]:
    """`filters` (each from `scope_filter`) OR-ed, a chunk per query."""
    return [
        " OR ".join(f"({f})" for f in filters[i : i + _OR_CHUNK])
        for i in range(0, len(filters), _OR_CHUNK)
    ]


class StoreReads(Searcher):
    """Row reads and embedding; declares the store-side state (set by
    `MemoryStore.__init__`)."""

    _path: Path
    _writes_lock: Path
    _db: Any
    _history: Any
    _schema: pa.Schema
    _history_schema: pa.Schema
    _lock: asyncio.Lock
    _writes: int
    _writes_changed: asyncio.Event
    _closed: bool
    _optimized_version: int | None

    async def _rows(
        self, where: str, *, vectors: bool = False, limit: int | None = None
    ) -> list[dict[str, Any]]:
        columns = [*MEMORY_COLUMNS, "vector", "hash"] if vectors else [*MEMORY_COLUMNS, "hash"]
        query = self._memories.query().where(where).select(columns)
        if limit is not None:
            query = query.limit(limit)
        return await query.to_list()

    async def _rows_by_ids(
        self, scope: Scope, ids: Sequence[str], *, vectors: bool = False
    ) -> dict[str, dict[str, Any]]:
        found: dict[str, dict[str, Any]] = {}
        unique = list(dict.fromkeys(ids))
        for i in range(0, len(unique), _IN_CHUNK):
            chunk = unique[i : i + _IN_CHUNK]
            for row in await self._rows(scope_filter(scope, ids=chunk), vectors=vectors):
                found[row["id"]] = row
        return found

    async def _history_ids(self, filters: Sequence[str]) -> set[str]:
        """Ids of the history entries matching any of `filters` (each one from
        `scope_filter`)."""
        found: set[str] = set()
        for where in _any_of(filters):
            rows = await self._history.query().where(where).select(["id"]).to_list()
            found.update(r["id"] for r in rows)
        return found

    async def _rows_any(
        self, filters: Sequence[str], *, vectors: bool = False
    ) -> list[dict[str, Any]]:
        """Rows matching any of `filters` (each one from `scope_filter`)."""
        rows: list[dict[str, Any]] = []
        for where in _any_of(filters):
            rows += await self._rows(where, vectors=vectors)
        return rows

    async def _embed(self, texts: Sequence[str]) -> np.ndarray:
        vectors = await self._embedder.embed(texts)
        if vectors.shape != (len(texts), self._embedder.dimensions):
            raise EmbedderError(
                f"embedder returned shape {vectors.shape}, "
                f"expected ({len(texts)}, {self._embedder.dimensions})"
            )
        return vectors
