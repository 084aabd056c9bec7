"""BM25 over character n-grams (memory/search/ngram_index.py): folded like the
LanceDB full-text index, scored by the textbook formula, exact across adds,
removes and delta merges."""

from __future__ import annotations

import math

import pytest

from memory.search.ngram_index import NgramIndex, ngrams


def test_ngrams_are_folded_like_the_lancedb_index():
    assert set(ngrams("上海")) == {"上", "海", "上海"}
    assert ngrams("Café")["caf"] == 1
    assert ngrams("\uff28\uff29") == ngrams("hi")  # full-width
    assert ngrams("aaa")["a"] == 3


def test_bm25_matches_the_textbook_formula():
    docs = ["red apple", "green apple pie", "blue sky"]
    index = NgramIndex.build(docs)
    scores = index.scores("apple", 3)
    grams = [ngrams(d) for d in docs]
    avg = sum(g.total() for g in grams) / 3
    expected = []
    for g in grams:
        s = 0.0
        for t in ngrams("apple"):
            df = sum(t in h for h in grams)
            if t in g:
                idf = math.log(1 + (3 - df + 0.5) / (df + 0.5))
                s += idf * g[t] * 2.2 / (g[t] + 1.2 * (0.25 + 0.75 * g.total() / avg))
        expected.append(s)
    assert scores == pytest.approx(expected, rel=1e-5)
    assert scores[2] < scores[0]


def test_bm25_statistics_follow_adds_and_removes():
    grown = NgramIndex.build(["red apple"])
    grown.add(1, "green apple pie")
    grown.add(2, "blue sky")
    grown.add(3, "old text")
    grown.remove(3)
    fresh = NgramIndex.build(["red apple", "green apple pie", "blue sky"])
    assert grown.scores("apple pie", 4)[:3] == pytest.approx(fresh.scores("apple pie", 3))


def test_many_adds_score_like_one_build_across_delta_merges():
    docs = [f"fact {i} about 上海 and tea number {i * 7}" for i in range(900)]
    grown = NgramIndex.build(docs[:100])
    for i, text in enumerate(docs[100:], start=100):
        grown.add(i, text)
        if i % 97 == 0:  # queries in between rebuild the delta
            grown.scores("tea 上海", i + 1)
    fresh = NgramIndex.build(docs)
    for query in ["number 63", "上海", "fact 899"]:
        assert grown.scores(query, 900) == pytest.approx(fresh.scores(query, 900), rel=1e-5)


def test_stop_grams_are_skipped_in_large_scopes_only():
    common = [f"the same words, note {i}" for i in range(1200)]
    big = NgramIndex.build(common)
    # Every n-gram of "the" is in every document: nothing left to score.
    assert not big.scores("the", 1200).any()
    # A rare n-gram still scores, and only its documents.
    scores = big.scores("the note 1199", 1200)
    assert scores.argmax() == 1199
    small = NgramIndex.build(common[:10])
    assert small.scores("the", 10).all()
