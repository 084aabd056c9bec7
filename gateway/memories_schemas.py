"""The request and response bodies of `/v1/memories` (gateway/memories_api.py)."""

from __future__ import annotations

from typing import Any, Literal

import msgspec

from memory.models import HistoryEntry, Memory, Operation
from memory.spool import JobInfo


class AddRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    user_id: str | None = None
    agent_id: str | None = None
    session_id: str | None = None
    text: str | None = None
    messages: list[dict[str, Any]] | None = None
    # True: extract facts through the LLM (queued); False: store the text as given.
    infer: bool = True
    metadata: dict[str, Any] | None = None
    # With infer=True, wait up to this many seconds for the extraction to finish.
    wait_seconds: float = 0.0


class SearchRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    query: str
    user_id: str | None = None
    agent_id: str | None = None
    limit: int | None = None
    include_superseded: bool = False


class UpdateRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    text: str | None = None
    metadata: dict[str, Any] | None = None


class SearchResult(msgspec.Struct, kw_only=True):
    memory: Memory
    score: float
    similarity: float


class AddResponse(msgspec.Struct, kw_only=True):
    results: list[Memory]
    job_id: str | None = None
    # For queued additions: pending, running, done or failed.
    job_state: str | None = None
    # Why a queued addition waits or failed (e.g. `no_key`: no key may be
    # sent to the extraction endpoint for this user yet; see docs/memory.md).
    job_reason: str | None = None
    # With `?wait=true` (or `wait_seconds`), once the job is done: what it
    # changed (ADD/UPDATE/DELETE; empty when there was nothing to remember).
    operations: list[Operation] | None = None


class MemoryList(msgspec.Struct, kw_only=True):
    object: Literal["list"] = "list"
    data: list[Memory]


class SearchResponse(msgspec.Struct, kw_only=True):
    results: list[SearchResult]


class HistoryResponse(msgspec.Struct, kw_only=True):
    data: list[HistoryEntry]


class UserCount(msgspec.Struct, kw_only=True):
    user_id: str
    memories: int


class UsersResponse(msgspec.Struct, kw_only=True):
    data: list[UserCount]


class JobsResponse(msgspec.Struct, kw_only=True):
    data: list[JobInfo]


class Deleted(msgspec.Struct, kw_only=True):
    deleted: int


class Retried(msgspec.Struct, kw_only=True):
    retried: int
