"""The recent-search memo: a search's cosine top list, reused by `related`.

The extraction of a chat exchange asks `related` for the same text the
request searched with, moments later: while the scope's cache token holds,
the search's top list answers it with no embedding and no scan. A serving
process may also hand the query's embedding to the extraction process
(`searched_vector` there, `expect_vector` here).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from memory.models import Scope
from memory.scope import ScopeKey
from memory.search.coherence import CacheCoherence
from memory.search.scope_index import Candidates

# Recent searches' top lists kept for `related` (see there).
RECENT_SEARCHES = 1024
# Longer than any text `related` is asked about (memory/engine.py, 1 000 characters).
HANDED_MAX_CHARS = 4096


def _recent_key(scope: Scope, text: str) -> tuple[ScopeKey, str]:
    return scope.key, text


class Nearest:
    """A search's cosine top list, valid while its scope's cache token holds,
    and the query's embedding (valid for good)."""

    __slots__ = ("complete", "rows", "token", "vector")

    def __init__(
        self,
        token: tuple[int, int],
        rows: list[Mapping[str, Any]],
        complete: bool,
        vector: np.ndarray,
    ) -> None:
        self.token = token
        self.rows = rows  # best first
        self.complete = complete  # every active row of the scope is in `rows`
        self.vector = vector


class RecentSearches(CacheCoherence):
    """Remembering searches, and answering `related` from them."""

    def _remember(
        self,
        scope: Scope,
        query: str,
        token: tuple[int, int],
        found: Candidates,
        vector: np.ndarray,
        *,
        complete: bool,
    ) -> None:
        if self._cache is None or token != self._cache.token(scope.user_id):
            return  # the scope changed during the search: nothing to vouch for
        key = _recent_key(scope, query)
        rows = [row for row, _ in found.by_vector]
        self._recent[key] = Nearest(token, rows, complete, vector)
        self._recent.move_to_end(key)
        while len(self._recent) > RECENT_SEARCHES:
            self._recent.popitem(last=False)

    async def _recently_found(
        self, scope: Scope, text: str, k: int
    ) -> list[Mapping[str, Any]] | None:
        """The rows of `related(scope, text, k)` from a recent search with the
        same text, when the scope has not changed since (same cache token) and
        it kept at least `k` rows (or all of them)."""
        assert self._cache is not None
        recent = self._recent.get(_recent_key(scope, text))
        if recent is None:
            return None
        await self._check_version(shared=True)  # follows other processes' writes: bumps the token
        if recent.token != self._cache.token(scope.user_id):
            return None
        if len(recent.rows) < k and not recent.complete:
            return None
        return recent.rows[:k]

    def searched_vector(self, scope: Scope, text: str) -> np.ndarray | None:
        """The embedding of `text`, if a search of `scope` used it lately: the
        serving process hands it with the exchange to the extraction process,
        whose `related` then needs no embedding (`expect_vector` there)."""
        recent = self._recent.get(_recent_key(scope, text))
        return None if recent is None else recent.vector

    def expect_vector(self, text: str, vector: np.ndarray) -> None:
        """`related(..., text, ...)` is coming, and this is the text's embedding
        (it depends on the text alone, so it is valid for any scope)."""
        if vector.shape != (self._embedder.dimensions,):
            return  # another embedder's: not usable here
        self._handed.put(text, vector)
