"""Rows of a loaded Arrow table, read lazily straight from its buffers.

A cached scope keeps the Arrow table it was loaded from (columnar, ~10x
smaller than a dict per row); a search turns only the rows it returns into
mappings, and those convert a value only when it is asked for.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import numpy as np
import pyarrow as pa


class ArrowRow(Mapping[str, Any]):
    """One row of a loaded table, read column by column when asked.

    It keeps nothing converted: the store remembers recent searches' rows
    (for the extraction of the same turn), and a thousand of them holding
    their converted text and timestamps cost ~15 MiB (docs/benchmarks.md).
    """

    __slots__ = ("_id", "_position", "_reader")

    def __init__(self, reader: RowReader, position: int, memory_id: str) -> None:
        self._reader = reader
        self._position = position
        self._id = memory_id

    def __getitem__(self, key: str) -> Any:
        if key == "id":
            return self._id
        return self._reader.value(self._position, key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._reader.names)

    def __len__(self) -> int:
        return len(self._reader.names)


_TIME_UNITS = {"s": 1_000_000, "ms": 1_000, "us": 1}


class RowReader:
    """Values of single rows of an Arrow table, read straight from its buffers.

    pyarrow's `take(...).to_pylist()` costs ~50 us a row here (its per-call
    overhead, and time-zone-aware timestamps above all): half a millisecond
    of event loop for the ~10 rows a search returns. Strings and timestamps
    (every column the store writes) are decoded here in about a microsecond;
    any other type goes through pyarrow.
    """

    def __init__(self, table: pa.Table) -> None:
        self.names = tuple(table.column_names)
        self._readers = {
            name: _column_reader(_one_array(column))
            for name, column in zip(table.column_names, table.columns, strict=True)
        }

    def value(self, i: int, name: str) -> Any:
        return self._readers[name](i)


def _one_array(column: pa.ChunkedArray) -> pa.Array:
    return column.chunk(0) if column.num_chunks == 1 else column.combine_chunks()


def _column_reader(array: pa.Array) -> Callable[[int], Any]:
    kind = array.type
    validity = array.buffers()[0]
    valid = (
        None
        if validity is None or array.null_count == 0
        else np.unpackbits(
            np.frombuffer(validity, dtype=np.uint8),
            count=array.offset + len(array),
            bitorder="little",
        )[array.offset :].astype(bool)
    )
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        offsets_type = np.int64 if pa.types.is_large_string(kind) else np.int32
        _, offsets_buffer, data_buffer = array.buffers()
        offsets = np.frombuffer(offsets_buffer, dtype=offsets_type)[
            array.offset : array.offset + len(array) + 1
        ]
        data = memoryview(data_buffer) if data_buffer is not None else memoryview(b"")

        def read_string(i: int) -> str | None:
            if valid is not None and not valid[i]:
                return None
            return str(data[offsets[i] : offsets[i + 1]], "utf-8")

        return read_string
    if pa.types.is_timestamp(kind) and kind.unit in _TIME_UNITS:
        scale = _TIME_UNITS[kind.unit]
        values = np.frombuffer(array.buffers()[1], dtype=np.int64)[
            array.offset : array.offset + len(array)
        ]
        zone = None if kind.tz is None else ZoneInfo(kind.tz)
        epoch = datetime(1970, 1, 1, tzinfo=None if zone is None else UTC)

        def read_time(i: int) -> datetime | None:
            if valid is not None and not valid[i]:
                return None
            moment = epoch + timedelta(microseconds=int(values[i]) * scale)
            return moment if zone is None else moment.astimezone(zone)

        return read_time
    return lambda i: array[i].as_py()
