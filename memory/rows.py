"""The shapes of stored rows: where rows are built, and read back as models.

Shared by the store (which writes rows) and search (which returns them),
so it sits beside both rather than inside either.

`memory_row` builds every `memories` row the store writes (the direct API,
an extraction's ADD/UPDATE, an import), `history_entry` every `history`
row; `to_memory`/`to_entry` turn read rows into `memory.models` objects.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
import uuid
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

import msgspec
import numpy as np

from memory.models import Actor, HistoryEntry, Memory

# The columns read back into a `Memory` (LanceDB also stores `vector` and `hash`).
MEMORY_COLUMNS = [
    "id",
    "user_id",
    "agent_id",
    "session_id",
    "text",
    "metadata",
    "created_at",
    "updated_at",
    "source",
    "superseded_by",
    "superseded_at",
]
_SPACE = re.compile(r"\s+")
_TRAILING = ".!?;,\u3002\uff01\uff1f\uff1b\uff0c"  # ASCII and full-width


def normalized_hash(text: str) -> str:
    """sha256 of the text with case, width, whitespace and final punctuation folded."""
    folded = _SPACE.sub(" ", unicodedata.normalize("NFKC", text).casefold()).strip()
    folded = folded.rstrip(_TRAILING).strip()
    return hashlib.sha256(folded.encode()).hexdigest()


def now() -> datetime:
    return datetime.now(UTC)


def utc(at: datetime) -> datetime:
    return at.replace(tzinfo=UTC) if at.tzinfo is None else at.astimezone(UTC)


def memory_row(
    *,
    id: str,
    user_id: str,
    agent_id: str | None,
    session_id: str | None,
    text: str,
    vector: np.ndarray | None,
    metadata: str,
    created_at: datetime,
    updated_at: datetime,
    source: str | None,
    superseded_by: str | None = None,
    superseded_at: datetime | None = None,
    hash: str | None = None,
) -> dict[str, Any]:
    """A `memories` row; `metadata` is JSON, `hash` defaults to the text's
    `normalized_hash`, `vector` may be filled in later (before the write)."""
    return {
        "id": id,
        "user_id": user_id,
        "agent_id": agent_id,
        "session_id": session_id,
        "text": text,
        "vector": vector,
        "hash": normalized_hash(text) if hash is None else hash,
        "metadata": metadata,
        "created_at": created_at,
        "updated_at": updated_at,
        "source": source,
        "superseded_by": superseded_by,
        "superseded_at": superseded_at,
    }


def history_entry(
    *,
    id: str,
    memory_id: str,
    user_id: str,
    agent_id: str | None,
    event: str,
    old_text: str | None,
    new_text: str | None,
    at: datetime,
    source: str | None,
    actor: Actor,
) -> dict[str, Any]:
    """A `history` row: `event` happened to memory `memory_id`."""
    return {
        "id": id,
        "memory_id": memory_id,
        "user_id": user_id,
        "agent_id": agent_id,
        "event": event,
        "old_text": old_text,
        "new_text": new_text,
        "at": at,
        "source": source,
        "actor": actor,
    }


def to_memory(row: Mapping[str, Any]) -> Memory:
    return Memory(
        id=row["id"],
        user_id=row["user_id"],
        agent_id=row["agent_id"],
        session_id=row["session_id"],
        text=row["text"],
        metadata=msgspec.json.decode(row["metadata"]) if row["metadata"] else {},
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        source=row["source"],
        superseded_by=row["superseded_by"],
        superseded_at=row["superseded_at"],
    )


def to_entry(row: dict[str, Any]) -> HistoryEntry:
    return HistoryEntry(
        id=row["id"],
        memory_id=row["memory_id"],
        user_id=row["user_id"],
        event=row["event"],
        old_text=row["old_text"],
        new_text=row["new_text"],
        at=row["at"],
        source=row["source"],
        actor=row["actor"],
    )


def changed(rows: Iterable[Mapping[str, Any]]) -> dict[str, set[str] | None]:
    """The ids each user's rows among `rows` have: what a write of them changed."""
    out: dict[str, set[str] | None] = {}
    for row in rows:
        ids = out.setdefault(row["user_id"], set())
        assert ids is not None
        ids.add(row["id"])
    return out


def entry_for(
    row: Mapping[str, Any],
    event: str,
    old: str | None,
    new: str | None,
    at: datetime,
    source: str | None,
    actor: Actor,
) -> dict[str, Any]:
    """A history entry, with a random id, for `event` on the memory `row`."""
    return history_entry(
        id=str(uuid.uuid4()),
        memory_id=row["id"],
        user_id=row["user_id"],
        agent_id=row["agent_id"],
        event=event,
        old_text=old,
        new_text=new,
        at=at,
        source=source,
        actor=actor,
    )
