"""Long-term, per-user memory: facts extracted from conversations, stored in LanceDB.

A library with no HTTP framework in it. `MemoryEngine` is the entry point; the
names below are imported lazily so that `memory.config` stays cheap to import.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "MemoryEngine": "memory.engine",
    "AddResult": "memory.engine",
    "InvalidImport": "memory.errors",
    "MemoryConfig": "memory.config",
    "ExtractionError": "memory.extraction",
    "JobInfo": "memory.spool",
    "Exchange": "memory.models",
    "HistoryEntry": "memory.models",
    "Hit": "memory.models",
    "InvalidScope": "memory.models",
    "Memory": "memory.models",
    "Operation": "memory.models",
    "Scope": "memory.models",
    "SpoolStats": "memory.models",
    "Stats": "memory.models",
}

__all__ = [
    "AddResult",
    "Exchange",
    "ExtractionError",
    "HistoryEntry",
    "Hit",
    "InvalidImport",
    "InvalidScope",
    "JobInfo",
    "Memory",
    "MemoryConfig",
    "MemoryEngine",
    "Operation",
    "Scope",
    "SpoolStats",
    "Stats",
]

if TYPE_CHECKING:
    from memory.config import MemoryConfig
    from memory.engine import AddResult, MemoryEngine
    from memory.errors import InvalidImport
    from memory.extraction import ExtractionError
    from memory.models import (
        Exchange,
        HistoryEntry,
        Hit,
        InvalidScope,
        Memory,
        Operation,
        Scope,
        SpoolStats,
        Stats,
    )
    from memory.spool import JobInfo


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'memory' has no attribute {name!r}")
    value = getattr(import_module(module), name)
    globals()[name] = value
    return value
