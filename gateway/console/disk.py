"""What the memory store looks like on disk, for the console's queue page:
directory size, LanceDB versions kept, and when the indices were last
rebuilt (maintenance's `optimize` folds new rows into them; nothing else
writes them after the store's creation). Read from the file system in a
thread, so it covers every process's writes and never touches LanceDB."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from memory.engine import STORE_DIR
from memory.schema import HISTORY, MEMORIES

_U64_MAX = 2**64 - 1


@dataclass(slots=True)
class TableOnDisk:
    name: str
    versions: int = 0  # version manifests kept
    latest_version: int | None = None
    bytes: int = 0
    # Newest index file (Unix time): the last optimize that had rows to fold
    # in, or the store's creation.
    indices_updated_at: float | None = None


@dataclass(slots=True)
class StoreOnDisk:
    data_bytes: int = 0  # the whole data directory: store, spool, keys
    tables: list[TableOnDisk] = field(default_factory=list)

    @property
    def indices_updated_at(self) -> float | None:
        times = [t.indices_updated_at for t in self.tables if t.indices_updated_at is not None]
        return max(times) if times else None


def _tree(path: Path) -> tuple[int, float | None]:
    """Total bytes under `path` and its newest file's mtime."""
    total, newest = 0, None
    for root, _, files in os.walk(path):
        for name in files:
            try:
                st = os.stat(os.path.join(root, name))
            except OSError:
                continue  # removed meanwhile (compaction, cleanup)
            total += st.st_size
            newest = st.st_mtime if newest is None else max(newest, st.st_mtime)
    return total, newest


def _table(directory: Path, name: str) -> TableOnDisk:
    table = TableOnDisk(name=name)
    base = directory / f"{name}.lance"
    table.bytes, _ = _tree(base)
    _, table.indices_updated_at = _tree(base / "_indices")
    try:
        manifests = [p.stem for p in (base / "_versions").iterdir() if p.suffix == ".manifest"]
    except OSError:
        manifests = []
    table.versions = len(manifests)
    # Lance's newer naming counts down from 2**64 - 1, so that the newest
    # manifest sorts first; the older one names versions as they are.
    numbers = [int(s) for s in manifests if s.isdigit()]
    versions = [_U64_MAX - n if n > _U64_MAX // 2 else n for n in numbers]
    table.latest_version = max(versions) if versions else None
    return table


def store_on_disk(data_dir: Path) -> StoreOnDisk:
    """Blocking: run it in a thread."""
    stats = StoreOnDisk()
    stats.data_bytes, _ = _tree(data_dir)
    store = data_dir / STORE_DIR
    stats.tables = [_table(store, MEMORIES), _table(store, HISTORY)]
    return stats
