"""The extraction plan (memory/store/plan.py): decisions without LanceDB."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from memory.models import Actor, Operation, Scope
from memory.rows import memory_row, normalized_hash
from memory.store.plan import Plan, op_id, op_texts

AT = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
EARLIER = datetime(2025, 1, 1, tzinfo=UTC)
ALICE = Scope(user_id="alice", agent_id="bot", session_id="s1")


@dataclass
class Job:
    ops: Sequence[Operation]
    scope: Scope = ALICE
    source: str = "job-1"
    actor: Actor = "extractor"
    at: datetime = AT
    fresh: bool = True
    metadata: str = '{"k": 1}'


def stored(memory_id: str, text: str, **extra: Any) -> dict[str, Any]:
    row = memory_row(
        id=memory_id,
        user_id="alice",
        agent_id="bot",
        session_id="s0",
        text=text,
        vector=None,
        metadata='{"old": true}',
        created_at=EARLIER,
        updated_at=EARLIER,
        source="earlier",
    )
    row.update(extra)
    return row


def decide(
    job: Job,
    existing: Sequence[dict[str, Any]] = (),
    active: dict[str, str] | None = None,
    recorded: set[str] | None = None,
) -> Plan[Job]:
    plan = Plan(job)
    plan.decide({r["id"]: r for r in existing}, dict(active or {}), recorded or set())
    return plan


# ---------- before deciding ----------


def test_ids_derive_from_source_and_index() -> None:
    plan = Plan(Job([Operation(op="ADD", text="a"), Operation(op="ADD", text="b")]))
    assert plan.new_ids == {0: op_id("job-1", 0, ""), 1: op_id("job-1", 1, "")}
    assert plan.entry_ids[1] == op_id("job-1", 1, "history")
    assert len(set(plan.new_ids.values()) | set(plan.entry_ids.values())) == 4
    assert Plan(Job([Operation(op="ADD", text="a")])).new_ids[0] == plan.new_ids[0]


def test_texts_are_stripped_and_empty_ones_dropped() -> None:
    ops = [
        Operation(op="ADD", text="  likes tea "),
        Operation(op="ADD", text="   "),
        Operation(op="DELETE", memory_id="m1", text="ignored"),
        Operation(op="UPDATE", memory_id="m2", text="new"),
        Operation(op="NONE", text="nothing"),
    ]
    assert op_texts(ops) == {0: "likes tea", 3: "new"}


def test_lookups_of_a_fresh_job_are_its_targets_only() -> None:
    ops = [
        Operation(op="ADD", text="Likes tea."),
        Operation(op="UPDATE", memory_id="m1", text="likes coffee"),
        Operation(op="DELETE", memory_id="m1"),
    ]
    fresh = Plan(Job(ops))
    assert fresh.lookup_ids == ["m1"]
    assert fresh.hashes == [normalized_hash("likes tea"), normalized_hash("likes coffee")]
    replay = Plan(Job(ops, fresh=False))
    assert replay.lookup_ids == ["m1", *replay.new_ids.values()]


# ---------- ADD ----------


def test_add_inserts_a_row_and_an_entry() -> None:
    plan = decide(Job([Operation(op="ADD", text=" Likes tea ")]))
    nid = plan.new_ids[0]
    row = plan.inserts[nid]
    assert row["text"] == "Likes tea"
    assert row["hash"] == normalized_hash("likes tea.")
    assert (row["user_id"], row["agent_id"], row["session_id"]) == ("alice", "bot", "s1")
    assert row["vector"] is None
    assert row["metadata"] == '{"k": 1}'
    assert row["created_at"] == row["updated_at"] == AT
    assert row["source"] == "job-1"
    assert row["superseded_by"] is None and row["superseded_at"] is None
    assert plan.entries == [
        {
            "id": plan.entry_ids[0],
            "memory_id": nid,
            "user_id": "alice",
            "agent_id": "bot",
            "event": "ADD",
            "old_text": None,
            "new_text": "Likes tea",
            "at": AT,
            "source": "job-1",
            "actor": "extractor",
        }
    ]
    assert plan.supersede == {} and plan.deletes == []


def test_add_of_an_active_duplicate_is_skipped() -> None:
    plan = decide(
        Job([Operation(op="ADD", text="LIKES TEA!")]), active={normalized_hash("likes tea"): "m1"}
    )
    assert plan.inserts == {} and plan.entries == []


def test_two_adds_of_the_same_text_insert_once() -> None:
    plan = decide(
        Job([Operation(op="ADD", text="likes tea"), Operation(op="ADD", text="Likes tea.")])
    )
    assert list(plan.inserts) == [plan.new_ids[0]]
    assert [e["id"] for e in plan.entries] == [plan.entry_ids[0]]


def test_add_replayed_after_its_row_landed_writes_only_the_entry() -> None:
    job = Job([Operation(op="ADD", text="likes tea")], fresh=False)
    nid = Plan(job).new_ids[0]
    plan = decide(job, existing=[stored(nid, "likes tea", agent_id="other")])
    assert plan.inserts == {}
    assert [(e["memory_id"], e["agent_id"]) for e in plan.entries] == [(nid, "other")]


def test_add_already_recorded_is_a_no_op() -> None:
    job = Job([Operation(op="ADD", text="likes tea")], fresh=False)
    plan = decide(job, recorded={Plan(job).entry_ids[0]})
    assert plan.inserts == {} and plan.entries == []


# ---------- UPDATE ----------


def test_update_supersedes_the_target_with_a_new_row() -> None:
    target = stored("m1", "likes tea")
    plan = decide(Job([Operation(op="UPDATE", memory_id="m1", text="likes coffee")]), [target])
    nid = plan.new_ids[0]
    row = plan.inserts[nid]
    assert row["text"] == "likes coffee"
    # The new row keeps the target's agent and metadata; the job's session wins.
    assert (row["agent_id"], row["metadata"], row["session_id"]) == ("bot", '{"old": true}', "s1")
    assert plan.supersede == {"m1": {**target, "superseded_by": nid, "superseded_at": AT}}
    assert [(e["event"], e["memory_id"], e["old_text"], e["new_text"]) for e in plan.entries] == [
        ("UPDATE", nid, "likes tea", "likes coffee")
    ]


def test_update_without_session_keeps_the_targets() -> None:
    job = Job(
        [Operation(op="UPDATE", memory_id="m1", text="likes coffee")],
        scope=Scope(user_id="alice"),
    )
    plan = decide(job, [stored("m1", "likes tea")])
    assert plan.inserts[plan.new_ids[0]]["session_id"] == "s0"


def test_update_to_an_existing_active_text_points_at_that_row() -> None:
    coffee = normalized_hash("likes coffee")
    plan = decide(
        Job([Operation(op="UPDATE", memory_id="m1", text="likes coffee")]),
        [stored("m1", "likes tea")],
        active={coffee: "m2"},
    )
    assert plan.inserts == {}
    assert plan.supersede["m1"]["superseded_by"] == "m2"
    assert plan.entries[0]["memory_id"] == "m2"


def test_update_to_the_same_normalized_text_is_skipped() -> None:
    plan = decide(
        Job([Operation(op="UPDATE", memory_id="m1", text="Likes tea!")]),
        [stored("m1", "likes tea")],
    )
    assert plan.inserts == {} and plan.supersede == {} and plan.entries == []


def test_update_of_a_row_superseded_by_someone_else_is_skipped() -> None:
    plan = decide(
        Job([Operation(op="UPDATE", memory_id="m1", text="likes coffee")]),
        [stored("m1", "likes tea", superseded_by="m9", superseded_at=EARLIER)],
    )
    assert plan.inserts == {} and plan.supersede == {} and plan.entries == []


def test_update_of_an_unknown_target_is_skipped() -> None:
    plan = decide(Job([Operation(op="UPDATE", memory_id="nope", text="x")]))
    assert plan.inserts == {} and plan.entries == []


def test_update_replayed_after_its_rows_landed_writes_only_the_entry() -> None:
    job = Job([Operation(op="UPDATE", memory_id="m1", text="likes coffee")], fresh=False)
    nid = Plan(job).new_ids[0]
    target = stored("m1", "likes tea", superseded_by=nid, superseded_at=AT)
    plan = decide(job, [target, stored(nid, "likes coffee")])
    assert plan.inserts == {} and plan.supersede == {}
    assert [(e["event"], e["memory_id"]) for e in plan.entries] == [("UPDATE", nid)]


def test_a_row_is_touched_once() -> None:
    plan = decide(
        Job(
            [
                Operation(op="UPDATE", memory_id="m1", text="likes coffee"),
                Operation(op="UPDATE", memory_id="m1", text="likes water"),
                Operation(op="DELETE", memory_id="m1"),
            ]
        ),
        [stored("m1", "likes tea")],
    )
    assert list(plan.inserts) == [plan.new_ids[0]]
    assert plan.deletes == []
    assert [e["event"] for e in plan.entries] == ["UPDATE"]


# ---------- DELETE ----------


def test_delete_removes_the_target_with_an_entry() -> None:
    plan = decide(Job([Operation(op="DELETE", memory_id="m1")]), [stored("m1", "likes tea")])
    assert plan.deletes == ["m1"]
    assert [(e["event"], e["memory_id"], e["old_text"], e["new_text"]) for e in plan.entries] == [
        ("DELETE", "m1", "likes tea", None)
    ]


def test_delete_replayed_deletes_again_without_a_second_entry() -> None:
    job = Job([Operation(op="DELETE", memory_id="m1")], fresh=False)
    plan = decide(job, [stored("m1", "likes tea")], recorded={Plan(job).entry_ids[0]})
    assert plan.deletes == ["m1"] and plan.entries == []


def test_delete_of_an_unknown_target_is_skipped() -> None:
    plan = decide(Job([Operation(op="DELETE", memory_id="nope"), Operation(op="NONE")]))
    assert plan.deletes == [] and plan.entries == []


def test_entries_follow_the_operations_order() -> None:
    plan = decide(
        Job(
            [
                Operation(op="DELETE", memory_id="m2"),
                Operation(op="ADD", text="likes tea"),
                Operation(op="UPDATE", memory_id="m1", text="likes coffee"),
            ]
        ),
        [stored("m1", "likes juice"), stored("m2", "likes milk")],
    )
    assert [e["event"] for e in plan.entries] == ["DELETE", "ADD", "UPDATE"]
    assert [e["id"] for e in plan.entries] == [plan.entry_ids[i] for i in range(3)]
