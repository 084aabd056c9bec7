"""How vector and full-text rankings are combined."""

from __future__ import annotations

import pytest

from memory.search.fusion import RRF_K, boosted_similarity, reciprocal_rank_fusion


def test_rrf_rewards_agreement_between_lists():
    scores = reciprocal_rank_fusion([["a", "b", "c"], ["b", "d"]])
    assert max(scores, key=scores.__getitem__) == "b"
    assert scores["a"] == pytest.approx(1 / (RRF_K + 1))
    assert set(scores) == {"a", "b", "c", "d"}


def test_boost_adds_at_most_the_weight_scaled_by_the_best_bm25():
    scores = boosted_similarity({"a": 0.5, "b": 0.3, "c": 0.2}, {"b": 8.0, "c": 2.0}, weight=0.1)
    assert scores == pytest.approx({"a": 0.5, "b": 0.4, "c": 0.225})


def test_boost_cannot_lift_a_weak_meaning_over_a_clearly_better_one():
    scores = boosted_similarity({"close": 0.41, "noise": 0.08}, {"noise": 1.0}, weight=0.1)
    assert scores["close"] > scores["noise"]


def test_boost_breaks_ties_by_full_text():
    scores = boosted_similarity({"a": 1.0, "b": 1.0}, {"b": 0.5}, weight=0.1)
    assert scores["b"] > scores["a"]


def test_boost_without_text_scores_is_the_similarity():
    assert boosted_similarity({"a": 0.7}, {}, weight=0.1) == {"a": 0.7}
