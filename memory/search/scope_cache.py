"""The search cache: recently searched scopes' `ScopeIndex`, an LRU bounded by bytes.

The store keeps entries exact: every write it makes is applied here, and
`token`s (per-user epochs) let it discard a load that raced with a write.
How the cache follows other processes' writes is `memory.search.coherence`.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from memory.scope import ScopeKey, key_sees
from memory.search.scope_index import ScopeIndex


class ScopeCache:
    """LRU of `ScopeIndex` by scope, bounded by their estimated bytes.

    `token(user)` before a load and `put(..., token)` after it: a write to
    that user (or a `clear`) in between makes the load stale, and it is not
    cached.
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._entries: OrderedDict[ScopeKey, ScopeIndex] = OrderedDict()
        self._by_user: dict[str, set[ScopeKey]] = {}
        self._epochs: dict[str, int] = {}
        self._generation = 0
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self._entries.values())

    def peek(self, key: ScopeKey) -> ScopeIndex | None:
        """The entry, if cached, without counting a hit or touching the LRU."""
        return self._entries.get(key)

    def get(self, key: ScopeKey) -> ScopeIndex | None:
        entry = self._entries.get(key)
        if entry is None:
            self.misses += 1
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        return entry

    def holds(self, user_id: str) -> bool:
        """Whether any scope of the user is cached."""
        return user_id in self._by_user

    def token(self, user_id: str) -> tuple[int, int]:
        return (self._generation, self._epochs.get(user_id, 0))

    def put(self, key: ScopeKey, entry: ScopeIndex, token: tuple[int, int]) -> bool:
        """Cache a freshly loaded entry unless a write made it stale or it is too big."""
        if token != self.token(key[0]) or entry.nbytes > self.max_bytes:
            return False
        self._discard(key)
        self._entries[key] = entry
        self._by_user.setdefault(key[0], set()).add(key)
        total = self.nbytes
        while total > self.max_bytes and len(self._entries) > 1:
            old, evicted = next(iter(self._entries.items()))
            total -= evicted.nbytes
            self._discard(old)
        return True

    def _discard(self, key: ScopeKey) -> None:
        if self._entries.pop(key, None) is not None:
            keys = self._by_user.get(key[0])
            if keys is not None:
                keys.discard(key)
                if not keys:
                    del self._by_user[key[0]]

    def _touch(self, user_id: str) -> list[tuple[ScopeKey, ScopeIndex]]:
        self._epochs[user_id] = self._epochs.get(user_id, 0) + 1
        return [(k, self._entries[k]) for k in self._by_user.get(user_id, ())]

    def apply(self, rows: Iterable[dict[str, Any]]) -> None:
        """Mirror rows just written (inserted or replaced whole, with vectors):
        active ones are upserted into the entries that can see them, the rest
        removed."""
        by_user: dict[str, list[dict[str, Any]]] = {}
        for row in rows:
            by_user.setdefault(row["user_id"], []).append(row)
        for user_id, user_rows in by_user.items():
            for key, entry in self._touch(user_id):
                for row in user_rows:
                    visible = key_sees(key, row)
                    if visible and row["superseded_by"] is None:
                        stored = {c: v for c, v in row.items() if c != "vector"}
                        entry.upsert(stored, np.asarray(row["vector"], dtype=np.float32))
                    else:
                        entry.remove([row["id"]])
                self._compact(key, entry)

    def remove(self, user_id: str, ids: Sequence[str]) -> None:
        for key, entry in self._touch(user_id):
            entry.remove(ids)
            self._compact(key, entry)

    def drop_user(self, user_id: str) -> None:
        for key, _ in self._touch(user_id):
            self._discard(key)

    def clear(self) -> None:
        self._generation += 1
        self._entries.clear()
        self._by_user.clear()

    def _compact(self, key: ScopeKey, entry: ScopeIndex) -> None:
        # Masked rows still cost a scan: reload once they outnumber live ones.
        if entry.dead > max(1024, len(entry)):
            self._discard(key)
