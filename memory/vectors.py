"""A per-scope in-memory copy of the active memories, for millisecond search.

LanceDB's prefiltered scan costs ~100 ms for a user with 10k memories; a
float32 matrix product over the same vectors costs about one. `ScopeIndex`
holds one scope's active rows, their L2-normalized vectors and an n-gram
BM25 index of their texts; `ScopeCache` keeps recently searched scopes in
an LRU bounded by bytes.

The store keeps entries exact: every write it makes is applied here, and
`epoch` tokens let it discard a load that raced with a write. Scoring runs
in a worker thread, so each index carries a lock its mutations also take.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from memory.ngram_index import NgramIndex

Key = tuple[str, str | None]  # (user_id, agent_id)


class Candidates:
    """The vector and full-text top lists of one query, as (row, similarity, bm25)."""

    __slots__ = ("by_text", "by_vector")

    def __init__(
        self,
        by_vector: list[tuple[dict[str, Any], float]],
        by_text: list[tuple[dict[str, Any], float, float]],
    ) -> None:
        self.by_vector = by_vector
        self.by_text = by_text


def _top(scores: np.ndarray, k: int) -> np.ndarray:
    """Positions of the k largest scores, best first (ties by position)."""
    if k >= len(scores):
        order = np.argsort(-scores, kind="stable")
    else:
        part = np.argpartition(-scores, k)[:k]
        order = part[np.lexsort((part, -scores[part]))]
    return order


def _unit(vectors: np.ndarray) -> np.ndarray:
    """L2-normalized rows (the embedders already return them; stored data may not)."""
    vectors = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=-1, keepdims=True)
    return vectors / np.where(norms > 0, norms, 1.0)


class ScopeIndex:
    """One scope's active memories: rows (without vectors), a vector matrix,
    and n-gram BM25 over the texts. Positions are append-only; replaced and
    removed rows are masked until the entry is rebuilt."""

    def __init__(self, rows: Sequence[dict[str, Any]], vectors: np.ndarray) -> None:
        n, dims = vectors.shape
        capacity = max(16, n + n // 8)
        self.lock = threading.Lock()
        self._rows: list[dict[str, Any] | None] = list(rows)
        self._pos = {row["id"]: i for i, row in enumerate(rows)}
        self._matrix = np.zeros((capacity, dims), dtype=np.float32)
        self._matrix[:n] = _unit(vectors)
        self._alive = np.zeros(capacity, dtype=bool)
        self._alive[:n] = True
        self._n = n
        self._text = NgramIndex.build([r["text"] for r in rows])

    def __len__(self) -> int:
        return len(self._pos)

    @property
    def dead(self) -> int:
        return self._n - len(self._pos)

    @property
    def nbytes(self) -> int:
        # ~1 KiB per row dict (id, text, timestamps...), the matrix, the text index.
        return self._matrix.nbytes + self._alive.nbytes + 1024 * self._n + self._text.nbytes

    def upsert(self, row: dict[str, Any], vector: np.ndarray) -> None:
        """Insert or replace a row by id (idempotent)."""
        with self.lock:
            self._remove(row["id"])
            if self._n == len(self._matrix):
                grown = np.zeros((2 * self._n, self._matrix.shape[1]), dtype=np.float32)
                grown[: self._n] = self._matrix
                alive = np.zeros(2 * self._n, dtype=bool)
                alive[: self._n] = self._alive[: self._n]
                self._matrix, self._alive = grown, alive
            i = self._n
            self._matrix[i] = _unit(vector)
            self._alive[i] = True
            self._rows.append(row)
            self._pos[row["id"]] = i
            self._text.add(i, row["text"])
            self._n += 1

    def remove(self, ids: Iterable[str]) -> None:
        with self.lock:
            for memory_id in ids:
                self._remove(memory_id)

    def _remove(self, memory_id: str) -> None:
        i = self._pos.pop(memory_id, None)
        if i is None:
            return
        row = self._rows[i]
        assert row is not None
        self._text.remove(i, row["text"])
        self._rows[i] = None
        self._alive[i] = False

    def nearest(self, vector: np.ndarray, k: int) -> list[tuple[dict[str, Any], float]]:
        """The k most cosine-similar rows (vectors are unit length)."""
        with self.lock:
            sims = self._similarities(vector)
            return [(self._row(i), float(sims[i])) for i in self._best(sims, k)]

    def candidates(self, vector: np.ndarray, text: str | None, k: int) -> Candidates:
        """Top k by cosine and, when `text` is given, top k by BM25 (score > 0)."""
        with self.lock:
            sims = self._similarities(vector)
            by_vector = [(self._row(i), float(sims[i])) for i in self._best(sims, k)]
            by_text: list[tuple[dict[str, Any], float, float]] = []
            if text:
                bm25 = self._text.scores(text, self._n)
                bm25[~self._alive[: self._n]] = 0.0
                hits = np.flatnonzero(bm25 > 0)
                if len(hits):
                    best = hits[_top(bm25[hits], k)]
                    by_text = [(self._row(i), float(sims[i]), float(bm25[i])) for i in best]
            return Candidates(by_vector, by_text)

    def _similarities(self, vector: np.ndarray) -> np.ndarray:
        sims = self._matrix[: self._n] @ np.asarray(vector, dtype=np.float32)
        sims[~self._alive[: self._n]] = -np.inf
        return sims

    def _best(self, sims: np.ndarray, k: int) -> list[int]:
        return [int(i) for i in _top(sims, min(k, len(self._pos)))]

    def _row(self, i: int) -> dict[str, Any]:
        row = self._rows[i]
        assert row is not None
        return row


class ScopeCache:
    """LRU of `ScopeIndex` by scope, bounded by their estimated bytes.

    `token(user)` before a load and `put(..., token)` after it: a write to
    that user (or a `clear`) in between makes the load stale, and it is not
    cached.
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._entries: OrderedDict[Key, ScopeIndex] = OrderedDict()
        self._by_user: dict[str, set[Key]] = {}
        self._epochs: dict[str, int] = {}
        self._generation = 0
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self._entries.values())

    def get(self, key: Key) -> ScopeIndex | None:
        entry = self._entries.get(key)
        if entry is None:
            self.misses += 1
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        return entry

    def token(self, user_id: str) -> tuple[int, int]:
        return (self._generation, self._epochs.get(user_id, 0))

    def put(self, key: Key, entry: ScopeIndex, token: tuple[int, int]) -> bool:
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

    def _discard(self, key: Key) -> None:
        if self._entries.pop(key, None) is not None:
            keys = self._by_user.get(key[0])
            if keys is not None:
                keys.discard(key)
                if not keys:
                    del self._by_user[key[0]]

    def _touch(self, user_id: str) -> list[tuple[Key, ScopeIndex]]:
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
                    visible = key[1] is None or row["agent_id"] == key[1]
                    if visible and row["superseded_by"] is None:
                        stored = {c: v for c, v in row.items() if c not in ("vector", "hash")}
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

    def _compact(self, key: Key, entry: ScopeIndex) -> None:
        # Masked rows still cost a scan: reload once they outnumber live ones.
        if entry.dead > max(1024, len(entry)):
            self._discard(key)
