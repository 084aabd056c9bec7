"""Applying an extraction job's decisions: ADD / UPDATE / DELETE / NONE,
idempotent replay, recovery from an interruption, scope safety."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from memory.models import Operation, Scope

ALICE = Scope(user_id="alice", session_id="s1")
BOB = Scope(user_id="bob")
AT = datetime(2025, 3, 14, 9, 30, tzinfo=UTC)


def add(text):
    return Operation(op="ADD", text=text)


def update(memory_id, text):
    return Operation(op="UPDATE", memory_id=memory_id, text=text)


def delete(memory_id):
    return Operation(op="DELETE", memory_id=memory_id)


async def apply(store, ops, source="job-1", scope=ALICE):
    return await store.apply(scope, ops, source=source, actor="extractor", at=AT)


async def texts(store, scope=ALICE, **kw):
    return sorted(m.text for m in await store.list(scope, **kw))


async def test_add_inserts_new_facts_with_source_session_and_time(store):
    entries = await apply(store, [add("Has a cat named Tom"), add("我住在上海")])
    assert [(e.event, e.new_text, e.actor, e.source) for e in entries] == [
        ("ADD", "Has a cat named Tom", "extractor", "job-1"),
        ("ADD", "我住在上海", "extractor", "job-1"),
    ]
    memories = await store.list(ALICE)
    assert sorted(m.text for m in memories) == ["Has a cat named Tom", "我住在上海"]
    assert {(m.source, m.session_id, m.created_at) for m in memories} == {("job-1", "s1", AT)}


async def test_add_of_a_fact_already_known_is_a_no_op(store):
    await store.add(ALICE, "Has a cat named Tom")
    assert await apply(store, [add("has a cat named tom."), add("Has a cat named Tom")]) == []
    assert await store.count(ALICE) == 1


async def test_update_supersedes_the_old_fact_which_stays_answerable(store):
    old = await store.add(ALICE, "Lives in Paris")
    [entry] = await apply(store, [update(old.id, "Lives in Rome")])
    assert (entry.event, entry.old_text, entry.new_text) == (
        "UPDATE",
        "Lives in Paris",
        "Lives in Rome",
    )
    assert await texts(store) == ["Lives in Rome"]
    assert await texts(store, include_superseded=True) == ["Lives in Paris", "Lives in Rome"]
    previous = await store.get(ALICE, old.id)
    assert previous is not None
    assert previous.superseded_by == entry.memory_id and previous.superseded_at == AT
    hits = await store.search(ALICE, "Lives in Paris", include_superseded=True, min_score=0.5)
    assert hits[0].memory.id == old.id
    assert all(
        h.memory.id != old.id for h in await store.search(ALICE, "Lives in Paris", min_score=0)
    )


async def test_history_follows_the_chain_of_updates_from_either_end(store):
    first = await store.add(ALICE, "Works at Acme", at=datetime(2025, 1, 1, tzinfo=UTC))
    [e1] = await apply(store, [update(first.id, "Works at Globex")], source="j1")
    [e2] = await store.apply(
        ALICE,
        [update(e1.memory_id, "Works at Initech")],
        source="j2",
        actor="api",
        at=datetime(2025, 6, 1, tzinfo=UTC),
    )
    expected = [
        ("ADD", None, "Works at Acme"),
        ("UPDATE", "Works at Acme", "Works at Globex"),
        ("UPDATE", "Works at Globex", "Works at Initech"),
    ]
    for memory_id in (first.id, e1.memory_id, e2.memory_id):
        got = await store.history(ALICE, memory_id)
        assert [(h.event, h.old_text, h.new_text) for h in got] == expected


async def test_update_to_the_same_text_or_of_a_superseded_fact_is_a_no_op(store):
    old = await store.add(ALICE, "Lives in Paris")
    assert await apply(store, [update(old.id, "lives in paris")], source="j1") == []
    await apply(store, [update(old.id, "Lives in Rome")], source="j2")
    assert await apply(store, [update(old.id, "Lives in Oslo")], source="j3") == []
    assert await texts(store) == ["Lives in Rome"]


async def test_update_into_an_existing_fact_merges_instead_of_duplicating(store):
    a = await store.add(ALICE, "Likes tea")
    b = await store.add(ALICE, "Likes green tea")
    [entry] = await apply(store, [update(a.id, "Likes green tea")])
    assert entry.memory_id == b.id
    assert await texts(store) == ["Likes green tea"]


async def test_delete_removes_the_fact_and_records_its_text(store):
    m = await store.add(ALICE, "Is vegetarian")
    [entry] = await apply(store, [delete(m.id)])
    assert (entry.event, entry.memory_id, entry.old_text) == ("DELETE", m.id, "Is vegetarian")
    assert await store.get(ALICE, m.id) is None


async def test_none_and_malformed_operations_change_nothing(store):
    m = await store.add(ALICE, "Is vegetarian")
    ops = [
        Operation(op="NONE"),
        Operation(op="ADD"),
        Operation(op="ADD", text="   "),
        Operation(op="UPDATE", text="no target"),
        Operation(op="UPDATE", memory_id=m.id),
        Operation(op="DELETE"),
        Operation(op="DELETE", memory_id="no-such-id"),
        Operation(op="UPDATE", memory_id="no-such-id", text="x"),
    ]
    assert await apply(store, ops) == []
    assert await texts(store) == ["Is vegetarian"]


async def test_ops_naming_another_users_memory_are_ignored(store):
    bobs = await store.add(BOB, "Bob's password hint is blue")
    assert await apply(store, [update(bobs.id, "pwned"), delete(bobs.id)]) == []
    got = await store.get(BOB, bobs.id)
    assert got is not None and got.text == "Bob's password hint is blue"
    assert got.superseded_by is None


async def test_first_decision_about_a_fact_wins_within_one_job(store):
    m = await store.add(ALICE, "Lives in Paris")
    entries = await apply(store, [update(m.id, "Lives in Rome"), delete(m.id)])
    assert [e.event for e in entries] == ["UPDATE"]
    assert await texts(store) == ["Lives in Rome"]


async def test_replaying_a_job_is_a_no_op(store):
    old = await store.add(ALICE, "Lives in Paris")
    gone = await store.add(ALICE, "Owns a car")
    ops = [add("Has a dog"), update(old.id, "Lives in Rome"), delete(gone.id), Operation(op="NONE")]
    first = await apply(store, ops)
    before = await store.export(ALICE)
    assert await apply(store, ops) == []
    assert await store.export(ALICE) == before
    assert len(first) == 3


async def test_replay_after_a_later_delete_does_not_resurrect_the_fact(store):
    [added] = await apply(store, [add("Has a dog")], source="j1")
    await apply(store, [delete(added.memory_id)], source="j2")
    await apply(store, [add("Has a dog")], source="j1")
    assert await texts(store) == []


async def test_new_row_ids_are_deterministic_per_source_and_position(store, tmp_path):
    [a] = await apply(store, [add("Plays chess")], source="job-x")
    await store.delete_all(ALICE)
    [b] = await apply(store, [add("Plays chess")], source="job-x")
    [c] = await apply(store, [add("Plays go")], source="job-y")
    assert a.memory_id == b.memory_id != c.memory_id


@pytest.mark.parametrize("fail_at", ["_upsert", "_record", "_remove"])
async def test_a_job_interrupted_at_any_write_and_replayed_ends_in_the_same_state(
    store, monkeypatch, fail_at
):
    early = datetime(2025, 1, 1, tzinfo=UTC)
    old = await store.add(ALICE, "Lives in Paris", at=early)
    gone = await store.add(ALICE, "Owns a car", at=early)
    ops = [add("Has a dog"), update(old.id, "Lives in Rome"), delete(gone.id)]

    original = getattr(store, fail_at)

    async def crash(*args, **kwargs):
        raise RuntimeError("killed")

    monkeypatch.setattr(store, fail_at, crash)
    with pytest.raises(RuntimeError, match="killed"):
        await apply(store, ops)
    monkeypatch.setattr(store, fail_at, original)
    await apply(store, ops)

    assert await texts(store) == ["Has a dog", "Lives in Rome"]
    assert await texts(store, include_superseded=True) == [
        "Has a dog",
        "Lives in Paris",
        "Lives in Rome",
    ]
    events = []
    for m in await store.export(ALICE):
        events += [(h.event, h.new_text) for h in await store.history(ALICE, m.id) if h.source]
    events.sort()
    # Each of the three decisions is recorded exactly once (the chain shows the
    # UPDATE from both of its rows, hence twice here).
    assert events == [
        ("ADD", "Has a dog"),
        ("UPDATE", "Lives in Rome"),
        ("UPDATE", "Lives in Rome"),
    ]
    deleted = await store.history(ALICE, gone.id)
    assert [h.event for h in deleted] == ["ADD", "DELETE"]
