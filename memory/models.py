"""The engine's vocabulary: who a memory belongs to, what it is, what happened to it."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

import msgspec

# Scopes belong to this vocabulary too; they are defined beside the isolation rule.
from memory.scope import MAX_ID_LENGTH as MAX_ID_LENGTH
from memory.scope import InvalidScope as InvalidScope
from memory.scope import Scope as Scope
from memory.scope import ScopeKey as ScopeKey
from memory.scope import validate_id as validate_id


class Memory(msgspec.Struct, kw_only=True):
    id: str
    user_id: str
    agent_id: str | None
    session_id: str | None
    text: str
    metadata: dict[str, Any]
    created_at: datetime
    updated_at: datetime
    # The exchange (spool job id) or API call that produced the current text.
    source: str | None = None
    # Set when a later fact replaced this one: the old fact stays answerable
    # ("where did I live before?") but is no longer injected by default.
    superseded_by: str | None = None
    superseded_at: datetime | None = None


class Hit(msgspec.Struct, kw_only=True):
    memory: Memory
    # Fused relevance, higher is better; `similarity` is the raw cosine.
    score: float
    similarity: float


Event = Literal["ADD", "UPDATE", "DELETE"]
Actor = Literal["extractor", "api", "import"]


class HistoryEntry(msgspec.Struct, kw_only=True):
    id: str
    memory_id: str
    user_id: str
    event: Event
    old_text: str | None
    new_text: str | None
    at: datetime
    source: str | None
    actor: Actor


class Operation(msgspec.Struct, kw_only=True):
    """One decision of the extractor, with aliases already resolved to ids."""

    op: Literal["ADD", "UPDATE", "DELETE", "NONE"]
    text: str | None = None
    memory_id: str | None = None


class Exchange(msgspec.Struct, kw_only=True):
    """A finished chat turn handed to the engine for extraction."""

    scope: Scope
    # Only the user turns that are new in this request (plus any system text
    # the app sent), OpenAI message dicts.
    messages: list[dict[str, Any]]
    reply: str | None
    at: datetime
    source: str | None = None
    # Given to the memories its extraction adds (`add(..., infer=True, metadata=...)`).
    metadata: dict[str, Any] | None = None


class SpoolStats(msgspec.Struct, kw_only=True):
    pending: int
    running: int
    failed: int
    done: int
    # How long the longest-waiting due job has waited: how far memory is behind.
    lag_seconds: float = 0.0


class LastError(msgspec.Struct, kw_only=True):
    message: str
    # The failure's category: model_unavailable, context_length, auth...
    reason: str | None
    at: datetime


class ExtractionStatus(msgspec.Struct, kw_only=True):
    """Where extraction goes and how it has gone lately."""

    endpoint: str
    model: str | None
    # The structured-output mode the endpoint accepted (None: not learned yet).
    mode: str | None
    # Which key extraction calls carry (never the key itself).
    key_source: str | None
    # `failing`: in the last `failing_window_seconds` jobs failed and none
    # succeeded; `idle`: no job has been tried yet.
    status: Literal["ok", "failing", "idle"]
    last_success_at: datetime | None
    last_error: LastError | None
    # Pending jobs by why they wait, failed ones by why they failed.
    jobs_by_reason: dict[str, dict[str, int]]


class Stats(msgspec.Struct, kw_only=True):
    memories: int
    users: int
    spool: SpoolStats
    extraction: ExtractionStatus | None = None


ImportReason = Literal[
    # skipped: nothing to do
    "already_present",
    "duplicate_in_import",
    # skipped: lost a race for its id with another writer during the import
    "id_taken",
    # failed: the line is a memory the store cannot hold
    "empty_text",
    "invalid_id",
]


class ImportIssue(msgspec.Struct, kw_only=True):
    """One memory of an import that was not stored, and why."""

    # 1-based position among the memories given: the line number of an
    # export file that has no blank lines.
    line: int
    id: str
    reason: ImportReason
    message: str


class ImportResult(msgspec.Struct, kw_only=True):
    """What an import did: every memory given is counted in exactly one field."""

    imported: int = 0
    skipped: list[ImportIssue] = msgspec.field(default_factory=list)
    failed: list[ImportIssue] = msgspec.field(default_factory=list)
