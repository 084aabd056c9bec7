"""In-memory BM25 over character n-grams, the full-text side of cached scopes.

It mirrors the LanceDB full-text index the store builds (n-grams of 1-3
characters over the whole text, spaces and punctuation included, lower-cased
and ASCII-folded), so a cached scope ranks text the way LanceDB does, without
LanceDB's per-query index scan. Statistics (document frequency, average
length) are those of the scope's live documents.

An n-gram is an int64 key (its code points, 21 bits each), so documents are
indexed with a few numpy sorts instead of a Python loop per n-gram, and the
postings are one CSR segment: sorted keys, offsets, document numbers and term
frequencies. Documents added later go to a small delta segment, rebuilt on
the next query after a write and merged into the base once it grows. Removed
documents stay in the postings, masked by a live flag that also gives the
exact live document frequency of each query n-gram.
"""

from __future__ import annotations

import unicodedata
from collections import Counter
from collections.abc import Sequence
from functools import lru_cache

import numpy as np

NGRAM_MIN = 1
NGRAM_MAX = 3
K1 = 1.2
B = 0.75
# The delta is merged into the base once it holds this many postings (or an
# eighth of the base, whichever is larger): merging re-sorts everything.
_MERGE_POSTINGS = 20_000
# Stop-grams: in a scope of at least `_STOP_MIN_DOCS` documents, an n-gram
# found in more than this fraction of them (" ", "e", "我") is not scored.
# Its idf is < 1.4 (a rare one ~9), and its postings are the bulk
# of a query's work. Measured on quality in docs/benchmarks.md.
_STOP_FRACTION = 0.25
_STOP_MIN_DOCS = 1000
_BITS = 21  # code points are < 0x110000 < 2**21; a key holds up to three


@lru_cache(maxsize=65536)
def _fold_char(c: str) -> str:
    """é -> e, full-width h -> h; characters with no ASCII base (上, 한) stay as they are."""
    k = unicodedata.normalize("NFKC", c)
    if k.isascii():
        return k
    d = unicodedata.normalize("NFKD", k)
    base = "".join(ch for ch in d if not unicodedata.combining(ch))
    return base if base.isascii() and base else k


def fold(text: str) -> str:
    text = text.lower()
    if text.isascii():
        return text
    return "".join(map(_fold_char, text)).lower()


def ngrams(text: str) -> Counter[str]:
    """Term frequencies of the text's 1-3 character n-grams."""
    t = fold(text)
    n = len(t)
    counts: Counter[str] = Counter()
    for size in range(NGRAM_MIN, NGRAM_MAX + 1):
        counts.update(t[i : i + size] for i in range(n - size + 1))
    return counts


def ngram_keys(texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every 1-3 character n-gram of the folded texts as (keys, text numbers),
    plus each text's n-gram count.

    Characters are stored +1 so that a key's length is part of its value:
    "a" < 2**21 <= "ab" < 2**42 <= "abc".
    """
    folded = [fold(t) for t in texts]
    lengths = np.fromiter(map(len, folded), dtype=np.int64, count=len(folded))
    total = int(lengths.sum())
    counts = np.zeros(len(folded), dtype=np.int64)
    if total == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int32), counts
    raw = "".join(folded).encode("utf-32-le", "surrogatepass")
    codes = np.frombuffer(raw, dtype=np.uint32).astype(np.int64) + 1
    doc_of = np.repeat(np.arange(len(folded), dtype=np.int32), lengths)
    ends = np.repeat(np.cumsum(lengths), lengths)
    positions = np.arange(total, dtype=np.int64)
    keys: list[np.ndarray] = []
    docs: list[np.ndarray] = []
    for size in range(NGRAM_MIN, NGRAM_MAX + 1):
        at = positions[positions + size <= ends]
        key = codes[at]
        for j in range(1, size):
            key = (key << _BITS) | codes[at + j]
        keys.append(key)
        docs.append(doc_of[at])
        counts += np.maximum(lengths - size + 1, 0)
    return np.concatenate(keys), np.concatenate(docs), counts


class _Segment:
    """Postings in CSR form: for `vocab[t]`, documents `docs[offsets[t]:offsets[t+1]]`."""

    __slots__ = ("docs", "offsets", "tfs", "vocab")

    def __init__(self, keys: np.ndarray, docs: np.ndarray) -> None:
        """From one (key, document) pair per n-gram occurrence."""
        vocab, token = np.unique(keys, return_inverse=True)
        span = int(docs.max()) + 1 if len(docs) else 1
        pairs, tfs = np.unique(token.astype(np.int64) * span + docs, return_counts=True)
        self.vocab = vocab
        self.offsets = np.zeros(len(vocab) + 1, dtype=np.int64)
        np.cumsum(np.bincount(pairs // span, minlength=len(vocab)), out=self.offsets[1:])
        self.docs = (pairs % span).astype(np.int32)
        self.tfs = np.minimum(tfs, np.iinfo(np.uint16).max).astype(np.uint16)

    @property
    def nbytes(self) -> int:
        return self.vocab.nbytes + self.offsets.nbytes + self.docs.nbytes + self.tfs.nbytes

    def postings(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(key, document, tf) per posting: the input of a merge."""
        lengths = np.diff(self.offsets)
        return np.repeat(self.vocab, lengths), self.docs, self.tfs

    def lookup(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(start, stop) into `docs` of each key, empty for keys not indexed."""
        where = np.searchsorted(self.vocab, keys)
        inside = where < len(self.vocab)
        found = np.zeros(len(keys), dtype=bool)
        found[inside] = self.vocab[where[inside]] == keys[inside]
        start = np.where(found, self.offsets[np.minimum(where, len(self.vocab))], 0)
        stop = np.where(found, self.offsets[np.minimum(where + 1, len(self.vocab))], 0)
        return start, stop


def _empty() -> _Segment:
    return _Segment(np.zeros(0, np.int64), np.zeros(0, np.int32))


def _gather(start: np.ndarray, stop: np.ndarray) -> np.ndarray:
    """The concatenated ranges start[i]:stop[i], without a Python loop."""
    lengths = stop - start
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    shift = np.repeat(start - (np.cumsum(lengths) - lengths), lengths)
    return np.arange(total, dtype=np.int64) + shift


class NgramIndex:
    """BM25 scores of numbered documents for a query, all documents at once.

    Not thread-safe: the owner serializes calls (`ScopeIndex.lock`).
    """

    def __init__(self) -> None:
        self._base = _empty()
        self._delta: _Segment | None = None
        self._pending: list[tuple[np.ndarray, np.ndarray]] = []  # (keys, docs) since the delta
        self._pending_postings = 0
        self._lengths = np.zeros(16, dtype=np.float32)
        self._live = np.zeros(16, dtype=bool)
        self._docs = 0
        self._total = 0.0
        # Documents removed since the build: while 0, every posting is live.
        self._removed = 0

    @classmethod
    def build(cls, texts: Sequence[str]) -> NgramIndex:
        """Index documents 0..len(texts)-1 in one pass."""
        index = cls()
        keys, docs, counts = ngram_keys(texts)
        index._base = _Segment(keys, docs)
        size = max(16, len(texts))
        index._lengths = np.zeros(size, dtype=np.float32)
        index._lengths[: len(texts)] = counts
        index._live = np.zeros(size, dtype=bool)
        index._live[: len(texts)] = True
        index._docs = len(texts)
        index._total = float(counts.sum())
        return index

    @property
    def nbytes(self) -> int:
        delta = self._delta.nbytes if self._delta is not None else 0
        pending = 12 * self._pending_postings
        return self._base.nbytes + delta + pending + self._lengths.nbytes + self._live.nbytes

    def add(self, doc: int, text: str) -> None:
        """Index a new document number (numbers are never reused)."""
        if doc >= len(self._lengths):
            size = max(doc + 1, 2 * len(self._lengths))
            lengths = np.zeros(size, dtype=np.float32)
            lengths[: len(self._lengths)] = self._lengths
            live = np.zeros(size, dtype=bool)
            live[: len(self._live)] = self._live
            self._lengths, self._live = lengths, live
        keys, _, counts = ngram_keys([text])
        self._pending.append((keys, np.full(len(keys), doc, dtype=np.int32)))
        self._pending_postings += len(keys)
        self._lengths[doc] = counts[0]
        self._live[doc] = True
        self._total += float(counts[0])
        self._docs += 1

    def remove(self, doc: int) -> None:
        """Forget a live document; its postings stay, masked."""
        if doc < len(self._live) and self._live[doc]:
            self._live[doc] = False
            self._total -= float(self._lengths[doc])
            self._docs -= 1
            self._removed += 1

    def _segments(self) -> list[_Segment]:
        """The base and an up-to-date delta, merging first when the delta is large."""
        if self._pending:
            parts = self._pending
            if self._delta is not None:
                keys, docs, tfs = self._delta.postings()
                parts = [(np.repeat(keys, tfs), np.repeat(docs, tfs)), *parts]
            keys = np.concatenate([k for k, _ in parts])
            docs = np.concatenate([d for _, d in parts])
            self._pending = []
            self._pending_postings = 0
            if len(keys) >= max(_MERGE_POSTINGS, len(self._base.docs) // 8):
                base_keys, base_docs, base_tfs = self._base.postings()
                keys = np.concatenate([np.repeat(base_keys, base_tfs), keys])
                docs = np.concatenate([np.repeat(base_docs, base_tfs), docs])
                self._base, self._delta = _Segment(keys, docs), None
            else:
                self._delta = _Segment(keys, docs)
        return [self._base] if self._delta is None else [self._base, self._delta]

    def scores(self, query: str, size: int) -> np.ndarray:
        """BM25 of documents 0..size-1 (any query n-gram matches, like LanceDB)."""
        out = np.zeros(size, dtype=np.float64)
        if self._docs <= 0 or not query:
            return out
        keys = np.unique(ngram_keys([query])[0])
        segments = self._segments()
        ranges = [segment.lookup(keys) for segment in segments]
        # Postings per query key (dead documents included): an upper bound of df.
        found = sum(stop - start for start, stop in ranges)
        keep = found > 0
        if self._docs >= _STOP_MIN_DOCS:
            keep &= found <= _STOP_FRACTION * self._docs
        if not keep.any():
            return out
        avg = max(self._total / self._docs, 1e-9)
        docs_parts, tfs_parts, key_parts = [], [], []
        for segment, (start, stop) in zip(segments, ranges, strict=True):
            start, stop = start[keep], stop[keep]
            at = _gather(start, stop)
            docs_parts.append(segment.docs[at])
            tfs_parts.append(segment.tfs[at])
            key_parts.append(np.repeat(np.arange(len(start)), stop - start))
        docs = np.concatenate(docs_parts)
        tfs = np.concatenate(tfs_parts).astype(np.float32)
        key_of = np.concatenate(key_parts)
        norm = np.float32(K1) * (np.float32(1 - B) + np.float32(B / avg) * self._lengths[docs])
        if self._removed == 0:
            # No document removed: postings per key are its document frequency.
            df = found[keep]
            idf = np.log1p((self._docs - df + 0.5) / (df + 0.5)).astype(np.float32)
            weights = idf[key_of] * tfs * (K1 + 1) / (tfs + norm)
        else:
            live = self._live[docs]
            df = np.bincount(key_of[live], minlength=int(keep.sum()))
            idf = np.log1p((self._docs - df + 0.5) / (df + 0.5)).astype(np.float32)
            weights = np.where(live, idf[key_of] * tfs * (K1 + 1) / (tfs + norm), 0.0)
        scored = np.bincount(docs, weights=weights, minlength=size)
        out[:] = scored[:size]
        return out
