"""Reciprocal-rank fusion: merge ranked lists whose scores are not comparable
(cosine similarity and BM25) by rank alone (Cormack et al., SIGIR 2009)."""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import TypeVar

K = TypeVar("K", bound=Hashable)

RRF_K = 60


def reciprocal_rank_fusion(rankings: Sequence[Sequence[K]], *, k: int = RRF_K) -> dict[K, float]:
    """Score each key by the sum of 1 / (k + rank) over the lists it appears in."""
    scores: dict[K, float] = {}
    for ranking in rankings:
        for rank, key in enumerate(ranking, start=1):
            scores[key] = scores.get(key, 0.0) + 1.0 / (k + rank)
    return scores


def boosted_similarity(
    similarity: dict[K, float], text_scores: dict[K, float], *, weight: float
) -> dict[K, float]:
    """Cosine similarity plus a full-text bonus of at most `weight`.

    BM25 is scaled by the best BM25 of the query, so the bonus orders lexical
    matches without letting n-gram noise (one shared character) outrank a
    clearly closer meaning, which plain rank fusion does.
    """
    top = max(text_scores.values(), default=0.0)
    scores = dict(similarity)
    if top > 0:
        for key, value in text_scores.items():
            if key in scores:
                scores[key] += weight * value / top
    return scores
