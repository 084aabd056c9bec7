"""Arrow schemas of the store's tables and the embedder stamp they carry.

The `memories` table records, in its schema metadata, which embedder and
dimension built its vectors; opening it with another one is `EmbedderMismatch`.
"""

from __future__ import annotations

import pyarrow as pa

MEMORIES = "memories"
HISTORY = "history"

EMBEDDER_KEY = b"memory.embedder"
DIMENSIONS_KEY = b"memory.dimensions"
SCHEMA_VERSION_KEY = b"memory.schema_version"
SCHEMA_VERSION = b"1"

_TS = pa.timestamp("us", tz="UTC")


class EmbedderMismatch(RuntimeError):
    """The table was built with a different embedder or dimension."""


def memories_schema(embedder: str, dimensions: int) -> pa.Schema:
    return pa.schema(
        [
            pa.field("id", pa.string(), nullable=False),
            pa.field("user_id", pa.string(), nullable=False),
            pa.field("agent_id", pa.string()),
            pa.field("session_id", pa.string()),
            pa.field("text", pa.string(), nullable=False),
            pa.field("vector", pa.list_(pa.float32(), dimensions), nullable=False),
            # sha256 of the normalized text: exact duplicates within a scope are one fact.
            pa.field("hash", pa.string(), nullable=False),
            # JSON object, kept as text so any shape round-trips.
            pa.field("metadata", pa.string(), nullable=False),
            pa.field("created_at", _TS, nullable=False),
            pa.field("updated_at", _TS, nullable=False),
            pa.field("source", pa.string()),
            pa.field("superseded_by", pa.string()),
            pa.field("superseded_at", _TS),
        ],
        metadata={
            EMBEDDER_KEY: embedder.encode(),
            DIMENSIONS_KEY: str(dimensions).encode(),
            SCHEMA_VERSION_KEY: SCHEMA_VERSION,
        },
    )


def history_schema() -> pa.Schema:
    return pa.schema(
        [
            pa.field("id", pa.string(), nullable=False),
            pa.field("memory_id", pa.string(), nullable=False),
            pa.field("user_id", pa.string(), nullable=False),
            pa.field("agent_id", pa.string()),
            pa.field("event", pa.string(), nullable=False),
            pa.field("old_text", pa.string()),
            pa.field("new_text", pa.string()),
            pa.field("at", _TS, nullable=False),
            pa.field("source", pa.string()),
            pa.field("actor", pa.string(), nullable=False),
        ],
        metadata={SCHEMA_VERSION_KEY: SCHEMA_VERSION},
    )


def check_embedder(schema: pa.Schema, embedder: str, dimensions: int) -> None:
    """Raise `EmbedderMismatch` unless `schema` was stamped by this embedder."""
    meta = schema.metadata or {}
    built_name = meta.get(EMBEDDER_KEY, b"").decode() or "<unknown>"
    built_dims = schema.field("vector").type.list_size
    if built_name != embedder or built_dims != dimensions:
        raise EmbedderMismatch(
            f"the memory table was built with embedder {built_name!r} ({built_dims} dimensions) "
            f"but the configured embedder is {embedder!r} ({dimensions} dimensions). "
            "Configure the original embedder, or export the memories, move the data "
            "directory aside and import them again to re-embed."
        )
