"""Whose memories an operation may see: the isolation rule, in one place.

A scope is a user, narrowed to one of their agents when it names one. The
session is provenance, not a boundary: a user's long-term memories follow
them across sessions. The rule exists in three forms, all written here or
derived from what is written here:

- `Scope.sees(row)`: the rule in Python, for rows already in memory (the
  search cache, the extraction apply step);
- `Scope.key`: what per-scope caches are keyed by (user and agent, no session);
- `memory.filters.scope_filter(scope)`: the same rule as a LanceDB filter,
  the only one a store query of a user's memories may use. The few queries
  that must look past one user (readiness, the user list, an import's id
  check...) are named in `memory.filters.UNSCOPED`, each with its reason.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import msgspec

from memory.errors import RejectedError

MAX_ID_LENGTH = 256

# (user_id, agent_id): the part of a scope that bounds what it sees.
ScopeKey = tuple[str, str | None]


class InvalidScope(RejectedError, ValueError):
    """An id that cannot name a user, agent or session."""


def validate_id(kind: str, value: str) -> str:
    """Reject ids that are empty, too long or carry control characters: ids
    end up in filters, cache keys and log lines."""
    if not value:
        raise InvalidScope(f"{kind} must not be empty")
    if len(value) > MAX_ID_LENGTH:
        raise InvalidScope(f"{kind} is longer than {MAX_ID_LENGTH} characters")
    if any(ord(c) < 32 or 127 <= ord(c) < 160 for c in value):
        raise InvalidScope(f"{kind} contains control characters")
    return value


def key_sees(key: ScopeKey, row: Mapping[str, Any]) -> bool:
    """Whether the scope with `key` may see `row` (a memory or history row)."""
    user_id, agent_id = key
    return row["user_id"] == user_id and (agent_id is None or row["agent_id"] == agent_id)


class Scope(msgspec.Struct, frozen=True, kw_only=True):
    """Whose memories an operation may see or change. Every store read and
    write takes one."""

    user_id: str
    agent_id: str | None = None
    session_id: str | None = None

    def __post_init__(self) -> None:
        validate_id("user_id", self.user_id)
        if self.agent_id is not None:
            validate_id("agent_id", self.agent_id)
        if self.session_id is not None:
            validate_id("session_id", self.session_id)

    @property
    def key(self) -> ScopeKey:
        return (self.user_id, self.agent_id)

    def sees(self, row: Mapping[str, Any]) -> bool:
        return key_sees(self.key, row)
