"""Importing memories (an export, perhaps another user's) into a user's scope.

Screening (empty texts, invalid ids, duplicates within the import), choosing
each memory's id (its own, or one derived from the target user so a second
import finds it, never another user's), and inserting in chunks under the
writer lock with an ADD history entry each.
"""

from __future__ import annotations

import builtins
import uuid
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import msgspec
import numpy as np

from memory.filters import unscoped
from memory.models import (
    ImportIssue,
    ImportReason,
    ImportResult,
    InvalidScope,
    Memory,
    Scope,
    validate_id,
)
from memory.rows import entry_for, memory_row, utc
from memory.store.apply import ApplyQueue
from memory.store.reads import _IN_CHUNK

# Ids of memories imported from another user (`_imported_id`).
_IMPORT_NAMESPACE = uuid.UUID("0b6f0e3c-5f2a-5d44-8e1b-7c39a2d4f815")


def _imported_id(user_id: str, memory_id: str) -> str:
    """The id `memory_id` gets when imported into `user_id`'s memory from
    elsewhere: derived, so a second import finds it. Validated ids hold no
    control character, so the separator keeps ("a:b", "c") apart from ("a", "b:c")."""
    return str(uuid.uuid5(_IMPORT_NAMESPACE, f"{user_id}\x1f{memory_id}"))


def _issue(line: int, m: Memory, reason: ImportReason, message: str) -> ImportIssue:
    return ImportIssue(line=line, id=m.id, reason=reason, message=message)


def _unstorable(m: Memory) -> tuple[ImportReason, str] | None:
    """Why a memory cannot be stored, if it cannot: ids end up in filters
    and scopes, so they must be valid ids."""
    if not m.text.strip():
        return "empty_text", "memory text must not be empty"
    for kind in ("id", "agent_id", "session_id", "superseded_by"):
        value = getattr(m, kind)
        try:
            if value is not None:
                validate_id(kind, value)
        except InvalidScope as exc:
            return "invalid_id", str(exc)
    return None


def _screen(memories: Iterable[Memory], result: ImportResult) -> list[tuple[int, Memory]]:
    """The memories worth planning, with their 1-based position; the others
    are counted in `result` as failed or skipped."""
    accepted: list[tuple[int, Memory]] = []
    seen: set[str] = set()
    for n, m in enumerate(memories, 1):
        if (problem := _unstorable(m)) is not None:
            result.failed.append(_issue(n, m, *problem))
        elif m.id in seen:
            result.skipped.append(_issue(n, m, "duplicate_in_import", "same id as an earlier line"))
        else:
            seen.add(m.id)
            accepted.append((n, m))
    return accepted


def _lookups(user_id: str, m: Memory) -> list[str]:
    """The ids whose owners decide where a memory goes (`_choose_id`)."""
    derived = _imported_id(user_id, m.id)
    return [m.id, derived] if m.user_id == user_id else [derived]


def _choose_id(
    user_id: str, m: Memory, owners: Mapping[str, str], keep_ids: bool
) -> tuple[str, bool]:
    """The id the memory gets, and whether the user has it already.

    The user's own memory under its own id, or under its derived id, is
    present. Otherwise it takes its own id when `keep_ids` and the id is
    free, else its derived id. Whether an id is held by another user changes
    the outcome only with `keep_ids` (an administrator, who may know): for
    anyone else the derived id is taken whatever other users hold, so an
    import tells nothing about their ids. An id held by someone else is
    never taken; if every candidate is (someone chose them on purpose), a
    random one is.
    """
    own = m.user_id == user_id
    derived = _imported_id(user_id, m.id)
    if own and owners.get(m.id) == user_id:
        return m.id, True
    if owners.get(derived) == user_id:
        return derived, True
    for candidate in [m.id, derived] if own and keep_ids else [derived]:
        if candidate not in owners:
            return candidate, False
    return str(uuid.uuid4()), False


def _imported_row(
    scope: Scope, m: Memory, memory_id: str, vector: np.ndarray, final: Mapping[str, str]
) -> dict[str, Any]:
    """The row of an imported memory. Its `superseded_by` follows the
    replacement to the id that one got; outside the import it keeps the
    user's own id, or takes the id another user's replacement would get."""
    replacement = m.superseded_by
    if replacement is not None:
        foreign = m.user_id != scope.user_id
        fallback = _imported_id(scope.user_id, replacement) if foreign else replacement
        replacement = final.get(replacement, fallback)
    return memory_row(
        id=memory_id,
        user_id=scope.user_id,
        agent_id=scope.agent_id or m.agent_id,
        session_id=m.session_id,
        text=m.text,
        vector=vector,
        metadata=msgspec.json.encode(m.metadata).decode(),
        created_at=utc(m.created_at),
        updated_at=utc(m.updated_at),
        source=m.source,
        superseded_by=replacement,
        superseded_at=utc(m.superseded_at) if m.superseded_at else None,
    )


class Imports(ApplyQueue):
    """`import_memories` and its id checks."""

    async def import_memories(
        self, scope: Scope, memories: Iterable[Memory], *, keep_ids: bool = False
    ) -> ImportResult:
        """Insert memories under `scope`'s user, keeping texts, metadata and
        timestamps; the result accounts for every memory given.

        A memory already present (the user's own, under its id or the id an
        earlier import gave it) is skipped: importing an export twice is
        harmless. With `keep_ids` (a restore by an administrator) the user's
        own memories keep their ids where free; other memories, and all of
        them without `keep_ids`, get an id derived from the target user and
        their own (`_imported_id`), so that import is idempotent too. No
        other user's row is ever overwritten (`_choose_id`).

        `superseded_by` follows a replacement in the import to its new id;
        a foreign one outside the import takes the id that replacement would
        get here. It is never dropped: a row replaced by nothing is active,
        and an outdated fact would come back into chats.
        """
        result = ImportResult()
        accepted = _screen(memories, result)
        owners = await self._owners([c for _, m in accepted for c in _lookups(scope.user_id, m)])
        planned: builtins.list[tuple[int, Memory, str]] = []
        final: dict[str, str] = {}
        for n, m in accepted:
            memory_id, present = _choose_id(scope.user_id, m, owners, keep_ids)
            final[m.id] = memory_id
            if present:
                result.skipped.append(_issue(n, m, "already_present", "already imported"))
            else:
                planned.append((n, m, memory_id))
        for start in range(0, len(planned), _IN_CHUNK):
            chunk = planned[start : start + _IN_CHUNK]
            result.imported += await self._import_chunk(scope, chunk, final, result)
        result.skipped.sort(key=lambda i: i.line)
        return result

    async def _import_chunk(
        self,
        scope: Scope,
        chunk: builtins.list[tuple[int, Memory, str]],
        final: Mapping[str, str],
        result: ImportResult,
    ) -> int:
        """Insert one chunk of planned rows; an id written meanwhile by
        someone else is skipped, never overwritten."""
        async with self._lock:
            owners = await self._owners([memory_id for _, _, memory_id in chunk])
            fresh = []
            for n, m, memory_id in chunk:
                owner = owners.get(memory_id)
                if owner is None:
                    fresh.append((m, memory_id))
                elif owner == scope.user_id:
                    result.skipped.append(_issue(n, m, "already_present", "already imported"))
                else:
                    result.skipped.append(_issue(n, m, "id_taken", "its id was taken meanwhile"))
            if not fresh:
                return 0
            vectors = await self._embed([m.text for m, _ in fresh])
            rows = [
                _imported_row(scope, m, memory_id, vec, final)
                for (m, memory_id), vec in zip(fresh, vectors, strict=True)
            ]
            await self._insert(rows)
            await self._record(
                [
                    entry_for(r, "ADD", None, r["text"], r["created_at"], r["source"], "import")
                    for r in rows
                ]
            )
        return len(rows)

    async def _owners(self, ids: Sequence[str]) -> dict[str, str]:
        """The user holding each of `ids` that exists, whoever it is (read
        only to keep an import off other users' ids)."""
        owners: dict[str, str] = {}
        unique = builtins.list(dict.fromkeys(ids))
        for i in range(0, len(unique), _IN_CHUNK):
            chunk = unique[i : i + _IN_CHUNK]
            query = self._memories.query().where(unscoped("import_owners", ids=chunk))
            for row in await query.select(["id", "user_id"]).to_list():
                owners[row["id"]] = row["user_id"]
        return owners
