"""Rows read lazily from a loaded Arrow table (memory/search/arrow_rows.py)."""

from __future__ import annotations

from datetime import UTC, datetime

import numpy as np

from memory.search.scope_index import ScopeIndex
from tests.memory.helpers import unit


def test_rows_read_from_arrow_buffers_equal_pyarrows_own_conversion():
    import pyarrow as pa

    at = datetime(2026, 11, 29, 1, 2, 3, 456789, tzinfo=UTC)
    table = pa.table(
        {
            "id": ["x", "a", "b", "c"],
            "text": ["skip", "plain", "accents: café, 上海, emoji 🎻", ""],
            "big": pa.array(["s", "one", None, "three"], type=pa.large_string()),
            "agent_id": ["s", None, "bot", None],
            "created_at": pa.array([at, at, None, datetime(1969, 12, 31, tzinfo=UTC)]),
            "naive": pa.array([at.replace(tzinfo=None)] * 4, type=pa.timestamp("ms")),
            "other": pa.array([1, 2, None, 4]),  # a type the reader leaves to pyarrow
            "vector": pa.FixedSizeListArray.from_arrays(
                pa.array(np.stack([unit(i) for i in range(4)]).ravel()), 8
            ),
        }
    ).slice(1)  # buffers with an offset
    index = ScopeIndex.from_arrow(table, 8)
    want = table.drop_columns(["vector"]).to_pylist()
    got = [dict(r) for r, _ in sorted(index.nearest(unit(0), 3), key=lambda p: p[0]["id"])]
    assert got == want
    assert [type(v) for v in got[0].values()] == [type(v) for v in want[0].values()]
