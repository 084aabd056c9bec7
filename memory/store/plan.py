"""Where an exchange's operations become row changes: the extraction plan.

`Plan` turns one extraction job's operations (ADD / UPDATE / DELETE from the
model) into rows to insert, rows to mark superseded, ids to delete and
history entries, given what is already stored. It does no I/O: the apply
queue (`memory.store.apply`) reads what the plan asks about, calls `decide`
and writes the result. Row and entry ids derive from (source, operation
index), so a job replayed after an interruption decides the same rows and
skips what was already written.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import datetime
from typing import Any, Generic, Protocol, TypeVar

from memory.models import Actor, Operation, Scope
from memory.rows import history_entry, memory_row, normalized_hash

# Deterministic ids of the rows and history entries an extraction job creates.
_ID_NAMESPACE = uuid.UUID("6f1c3a52-4d0e-5b8a-9f57-2b9c1e0d7a41")


class Job(Protocol):
    """What a plan needs of one extraction job."""

    scope: Scope
    ops: Sequence[Operation]
    source: str
    actor: Actor
    at: datetime
    fresh: bool  # nothing of `source` was ever written: no replay checks
    metadata: str  # JSON, for the rows its ADDs insert


J = TypeVar("J", bound=Job)


def op_id(source: str, index: int, kind: str) -> str:
    return str(uuid.uuid5(_ID_NAMESPACE, f"{source}:{index}" + (f":{kind}" if kind else "")))


def op_texts(ops: Sequence[Operation]) -> dict[int, str]:
    """The stripped new text of each ADD and UPDATE, by operation index."""
    return {
        i: op.text.strip()
        for i, op in enumerate(ops)
        if op.op in ("ADD", "UPDATE") and op.text and op.text.strip()
    }


class Plan(Generic[J]):
    """What one job's operations change, given what is stored (no I/O).

    Before `decide`, `lookup_ids` are the rows to read (targets, and the
    job's own rows when it may be a replay) and `hashes` the normalized
    texts whose active duplicates to look for. After it, `inserts` (rows
    without vectors), `supersede` (whole rows with `superseded_by` set),
    `deletes` (ids) and `entries` (history rows) are what to write.
    """

    def __init__(self, request: J) -> None:
        self.request = request
        ops = request.ops
        self.new_ids = {i: op_id(request.source, i, "") for i in range(len(ops))}
        self.entry_ids = {i: op_id(request.source, i, "history") for i in range(len(ops))}
        self.texts = op_texts(ops)
        targets = [op.memory_id for op in ops if op.op in ("UPDATE", "DELETE") and op.memory_id]
        # A fresh job cannot have written its own rows yet: only targets are read.
        own = [] if request.fresh else list(self.new_ids.values())
        self.lookup_ids = list(dict.fromkeys([*targets, *own]))
        self.hashes = list(dict.fromkeys(normalized_hash(t) for t in self.texts.values()))
        self.inserts: dict[str, dict[str, Any]] = {}
        self.supersede: dict[str, dict[str, Any]] = {}
        self.deletes: list[str] = []
        self.entries: list[dict[str, Any]] = []

    def decide(
        self,
        existing: dict[str, dict[str, Any]],
        active_hashes: dict[str, str],
        recorded: set[str],
    ) -> None:
        """Decide every operation in order.

        `existing`: the stored rows of `lookup_ids` in the job's scope, by id;
        `active_hashes`: hash -> id of the scope's active rows with `hashes`
        (updated here as rows are added); `recorded`: which of `entry_ids`
        the history already holds. A row is touched by one UPDATE or DELETE
        at most.
        """
        touched: set[str] = set()
        for i, op in enumerate(self.request.ops):
            if op.op == "ADD":
                self._add(i, existing, active_hashes, recorded)
            elif op.op == "UPDATE":
                self._update(i, op, existing, active_hashes, recorded, touched)
            elif op.op == "DELETE":
                self._delete(i, op, existing, recorded, touched)

    def _add(
        self,
        i: int,
        existing: dict[str, dict[str, Any]],
        active_hashes: dict[str, str],
        recorded: set[str],
    ) -> None:
        """A new row, unless the text is empty, an active row has it already,
        or a replay finds the row (then only its history entry is missing)."""
        if i not in self.texts or self.entry_ids[i] in recorded:
            return
        nid = self.new_ids[i]
        text = self.texts[i]
        if nid in existing:  # inserted before an interruption
            self._entry(i, nid, "ADD", None, text, existing[nid]["agent_id"])
            return
        digest = normalized_hash(text)
        if digest in active_hashes:
            return
        scope = self.request.scope
        self.inserts[nid] = self._new_row(
            i, text, scope.agent_id, scope.session_id, self.request.metadata, digest
        )
        active_hashes[digest] = nid
        self._entry(i, nid, "ADD", None, text, scope.agent_id)

    def _update(
        self,
        i: int,
        op: Operation,
        existing: dict[str, dict[str, Any]],
        active_hashes: dict[str, str],
        recorded: set[str],
        touched: set[str],
    ) -> None:
        """The target is superseded by a new row with the new text, or by the
        active row that already has that text. Superseded targets (by
        someone else), unchanged texts and replayed entries are skipped."""
        target = existing.get(op.memory_id or "")
        if i not in self.texts or self.entry_ids[i] in recorded or target is None:
            return
        if target["id"] in touched:
            return
        nid = self.new_ids[i]
        text = self.texts[i]
        if target["superseded_by"] not in (None, nid):
            return
        digest = normalized_hash(text)
        if digest == target["hash"]:
            return
        touched.add(target["id"])
        replacement = active_hashes.get(digest)
        if replacement is None or replacement == target["id"]:
            replacement = nid
            if nid not in existing:
                self.inserts[nid] = self._new_row(
                    i,
                    text,
                    target["agent_id"],
                    self.request.scope.session_id or target["session_id"],
                    target["metadata"],
                    digest,
                )
            active_hashes[digest] = nid
        if target["superseded_by"] is None:
            self.supersede[target["id"]] = {
                **target,
                "superseded_by": replacement,
                "superseded_at": self.request.at,
            }
        self._entry(i, replacement, "UPDATE", target["text"], text, target["agent_id"])

    def _delete(
        self,
        i: int,
        op: Operation,
        existing: dict[str, dict[str, Any]],
        recorded: set[str],
        touched: set[str],
    ) -> None:
        """The target goes (again, on a replay); its entry is written once."""
        target = existing.get(op.memory_id or "")
        if target is None or target["id"] in touched:
            return
        touched.add(target["id"])
        self.deletes.append(target["id"])
        if self.entry_ids[i] not in recorded:
            self._entry(i, target["id"], "DELETE", target["text"], None, target["agent_id"])

    def _new_row(
        self,
        i: int,
        text: str,
        agent_id: str | None,
        session_id: str | None,
        metadata: str,
        digest: str,
    ) -> dict[str, Any]:
        at = self.request.at
        return memory_row(
            id=self.new_ids[i],
            user_id=self.request.scope.user_id,
            agent_id=agent_id,
            session_id=session_id,
            text=text,
            vector=None,
            metadata=metadata,
            created_at=at,
            updated_at=at,
            source=self.request.source,
            hash=digest,
        )

    def _entry(
        self,
        i: int,
        memory_id: str,
        event: str,
        old: str | None,
        new: str | None,
        agent_id: str | None,
    ) -> None:
        request = self.request
        self.entries.append(
            history_entry(
                id=self.entry_ids[i],
                memory_id=memory_id,
                user_id=request.scope.user_id,
                agent_id=agent_id,
                event=event,
                old_text=old,
                new_text=new,
                at=request.at,
                source=request.source,
                actor=request.actor,
            )
        )
