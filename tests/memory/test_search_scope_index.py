"""One scope's rows, vectors and BM25 in memory (memory/search/scope_index.py):
ranked by cosine, rows replaced by id, loaded from Arrow, and consistent when
a row changes while a search is scoring."""

from __future__ import annotations

import numpy as np
import pytest

from memory.search.scope_index import ScopeIndex
from tests.memory.helpers import row, unit


def test_index_ranks_by_cosine_and_replaces_rows_by_id():
    index = ScopeIndex([row("a", "one"), row("b", "two")], np.stack([unit(1), unit(2)]))
    assert [r["id"] for r, _ in index.nearest(unit(2), 2)] == ["b", "a"]
    index.upsert(row("b", "two again"), unit(3))
    index.upsert(row("b", "two again"), unit(3))
    assert len(index) == 2
    [(best, sim)] = index.nearest(unit(3), 1)
    assert (best["text"], sim) == ("two again", pytest.approx(1.0))
    index.remove(["a", "missing"])
    assert [r["id"] for r, _ in index.nearest(unit(1), 5)] == ["b"]


def test_an_index_from_arrow_returns_the_rows_as_dicts():
    import pyarrow as pa

    table = pa.table(
        {
            "id": ["a", "b", "c"],
            "text": ["one", "two", "three"],
            "vector": pa.FixedSizeListArray.from_arrays(
                pa.array(np.stack([unit(1), unit(2), unit(3)]).ravel()), 8
            ),
        }
    )
    index = ScopeIndex.from_arrow(table, 8)
    index.upsert({"id": "d", "text": "four"}, unit(4))
    index.remove(["b"])
    assert [r for r, _ in index.nearest(unit(3), 1)] == [{"id": "c", "text": "three"}]
    found = index.candidates(unit(4), "thr", 5)  # "one" shares no n-gram
    assert found.by_vector[0][0] == {"id": "d", "text": "four"}
    assert {r["id"] for r, _ in found.by_vector} == {"a", "c", "d"}
    assert {r["id"] for r, _, _ in found.by_text} == {"c", "d"}


def test_a_row_removed_while_its_search_was_scoring_is_not_returned():
    index = ScopeIndex(
        [row("a", "apple pie"), row("b", "apple tart")], np.stack([unit(1), unit(2)])
    )
    sims, by_vec = index.vector_top(unit(1), 2)
    by_text = index.text_top("apple", 2)
    index.remove(["a"])
    index.upsert(row("c", "apple juice"), unit(3))  # after the product: no similarity for it
    found = index.assemble(sims, by_vec, by_text)
    assert [r["id"] for r, _ in found.by_vector] == ["b"]
    assert [r["id"] for r, _, _ in found.by_text] == ["b"]
