"""In-memory BM25 over character n-grams, the full-text side of cached scopes.

It mirrors the LanceDB full-text index the store builds (n-grams of 1-3
characters over the whole text, spaces and punctuation included, lower-cased
and ASCII-folded), so a cached scope ranks text the way LanceDB does, without
LanceDB's per-query index scan. Statistics (document frequency, average
length) are those of the scope's live documents.

Documents are numbered by the caller. Postings built in bulk are numpy arrays;
documents added later go to a small Python delta that is merged into the
arrays once it grows. Removed documents stay in the postings: the caller
masks their scores.
"""

from __future__ import annotations

import math
import unicodedata
from collections import Counter
from collections.abc import Sequence
from functools import lru_cache

import numpy as np

NGRAM_MIN = 1
NGRAM_MAX = 3
K1 = 1.2
B = 0.75
# The delta is merged into the arrays once it holds this many postings.
_MERGE_POSTINGS = 50_000


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


class NgramIndex:
    """BM25 scores of numbered documents for a query, all documents at once."""

    def __init__(self) -> None:
        self._base: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self._delta: dict[str, tuple[list[int], list[int]]] = {}
        self._delta_size = 0
        self._df: Counter[str] = Counter()
        self._lengths = np.zeros(0, dtype=np.float32)
        self._docs = 0
        self._total = 0.0
        self._postings = 0

    @classmethod
    def build(cls, texts: Sequence[str]) -> NgramIndex:
        """Index documents 0..len(texts)-1 in one pass."""
        index = cls()
        docs: dict[str, list[int]] = {}
        tfs: dict[str, list[int]] = {}
        lengths = np.zeros(max(16, len(texts)), dtype=np.float32)
        for doc, text in enumerate(texts):
            counts = ngrams(text)
            for token, tf in counts.items():
                d = docs.get(token)
                if d is None:
                    docs[token] = [doc]
                    tfs[token] = [tf]
                else:
                    d.append(doc)
                    tfs[token].append(tf)
            lengths[doc] = n = counts.total()
            index._total += n
        index._base = {
            t: (np.array(d, dtype=np.int32), np.array(tfs[t], dtype=np.float32))
            for t, d in docs.items()
        }
        index._df = Counter({t: len(d) for t, d in docs.items()})
        index._lengths = lengths
        index._docs = len(texts)
        index._postings = sum(len(d) for d in docs.values())
        return index

    @property
    def nbytes(self) -> int:
        """Rough footprint: arrays, plus dict and object overhead per token."""
        return self._postings * 8 + len(self._df) * 200 + self._lengths.nbytes

    def add(self, doc: int, text: str) -> None:
        if doc >= len(self._lengths):
            grown = np.zeros(max(doc + 1, 2 * len(self._lengths)), dtype=np.float32)
            grown[: len(self._lengths)] = self._lengths
            self._lengths = grown
        counts = ngrams(text)
        for token, tf in counts.items():
            d = self._delta.get(token)
            if d is None:
                self._delta[token] = ([doc], [tf])
            else:
                d[0].append(doc)
                d[1].append(tf)
            self._df[token] += 1
        self._lengths[doc] = n = counts.total()
        self._total += n
        self._docs += 1
        self._delta_size += len(counts)
        self._postings += len(counts)
        if self._delta_size >= _MERGE_POSTINGS:
            self._merge()

    def remove(self, doc: int, text: str) -> None:
        """Forget a live document's statistics; its postings stay, masked by the caller."""
        for token in ngrams(text):
            self._df[token] -= 1
            if self._df[token] <= 0:
                del self._df[token]
        self._total -= float(self._lengths[doc])
        self._docs -= 1

    def _merge(self) -> None:
        for token, (d, tf) in self._delta.items():
            new = (np.array(d, dtype=np.int32), np.array(tf, dtype=np.float32))
            old = self._base.get(token)
            if old is not None:
                new = (np.concatenate([old[0], new[0]]), np.concatenate([old[1], new[1]]))
            self._base[token] = new
        self._delta = {}
        self._delta_size = 0

    def scores(self, query: str, size: int) -> np.ndarray:
        """BM25 of documents 0..size-1 (any query n-gram matches, like LanceDB)."""
        out = np.zeros(size, dtype=np.float32)
        if self._docs <= 0:
            return out
        avg = max(self._total / self._docs, 1e-9)
        norm = K1 * (1 - B + B * self._lengths[:size] / avg)
        for token in ngrams(query):
            df = self._df.get(token, 0)
            if df <= 0:
                continue
            idf = math.log(1 + (self._docs - df + 0.5) / (df + 0.5))
            for docs, tf in self._postings_of(token):
                out[docs] += idf * tf * (K1 + 1) / (tf + norm[docs])
        return out

    def _postings_of(self, token: str) -> list[tuple[np.ndarray, np.ndarray]]:
        found = []
        base = self._base.get(token)
        if base is not None:
            found.append(base)
        delta = self._delta.get(token)
        if delta is not None:
            found.append((np.array(delta[0], dtype=np.int32), np.array(delta[1], np.float32)))
        return found
