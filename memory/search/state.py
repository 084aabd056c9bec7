"""What the search mixins need of the store they are part of.

`MemoryStore` (memory/store/) is built from layers: the search ones here
(`coherence`, `recent`, `searcher`) come first and know nothing of the
store's package; this class declares the state and the two reads they use,
which `memory.store.base.StoreBase` provides.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import numpy as np

from memory.changelog import VersionLog
from memory.config import MemoryConfig
from memory.embedding import Embedder, QueryCache
from memory.models import Scope
from memory.scope import ScopeKey
from memory.search.scope_cache import ScopeCache
from memory.search.scope_index import ScopeIndex

if TYPE_CHECKING:
    from memory.search.recent import Nearest


class SearchState:
    """Attributes set by `StoreBase.__init__`; see there."""

    _memories: Any
    _embedder: Embedder
    _config: MemoryConfig
    _changes: VersionLog
    _cache: ScopeCache | None
    _loading: dict[ScopeKey, asyncio.Future[ScopeIndex]]
    _recent: OrderedDict[tuple[ScopeKey, str], Nearest]
    _handed: QueryCache
    _scorer: ThreadPoolExecutor
    _text_scorer: ThreadPoolExecutor
    _checking: asyncio.Future[bool] | None
    _version: int | None
    _unlogged_since: float | None
    _own_writes: int
    # Shared store (`storage.uri`): seconds between version checks, and the
    # monotonic time before which the last check stands; None: a local store.
    _refresh: float | None
    _fresh_until: float

    async def _embed(self, texts: Sequence[str]) -> np.ndarray:
        raise NotImplementedError

    async def _local_writers_quiet(self) -> bool:
        raise NotImplementedError

    async def _rows_by_ids(
        self, scope: Scope, ids: Sequence[str], *, vectors: bool = False
    ) -> dict[str, dict[str, Any]]:
        raise NotImplementedError
