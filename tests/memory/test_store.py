"""The store's direct API: CRUD, history, export/import, counts, embedder stamp."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from memory.models import Scope
from memory.schema import EmbedderMismatch
from memory.store import MemoryStore, normalized_hash
from tests.memory.helpers import HashEmbedder

ALICE = Scope(user_id="alice")
BOB = Scope(user_id="bob")


async def test_add_then_get_returns_the_stored_memory(store):
    m = await store.add(ALICE, "  Likes green tea  ", metadata={"topic": "food"})
    got = await store.get(ALICE, m.id)
    assert got is not None
    assert got.text == "Likes green tea"
    assert got.metadata == {"topic": "food"}
    assert got.user_id == "alice"
    assert got.created_at.tzinfo is not None


async def test_adding_the_same_fact_twice_returns_the_existing_memory(store):
    first = await store.add(ALICE, "Lives in Berlin.")
    second = await store.add(ALICE, "lives in  berlin")
    assert second.id == first.id
    assert await store.count(ALICE) == 1


async def test_duplicates_are_per_user(store):
    await store.add(ALICE, "Lives in Berlin")
    await store.add(BOB, "Lives in Berlin")
    assert await store.count(ALICE) == 1
    assert await store.count(BOB) == 1


def test_normalized_hash_folds_case_width_space_and_final_punctuation():
    assert normalized_hash("Lives in Berlin.") == normalized_hash(" lives  in berlin ")
    assert normalized_hash("我住在上海。") == normalized_hash("我住在上海")
    assert normalized_hash("\uff21\uff22\uff23") == normalized_hash("abc")
    assert normalized_hash("Lives in Berlin") != normalized_hash("Lives in Bern")


async def test_empty_text_is_rejected(store):
    with pytest.raises(ValueError):
        await store.add(ALICE, "   ")


async def test_list_pages_oldest_first_and_hides_superseded_by_default(store):
    t0 = datetime(2025, 1, 1, tzinfo=UTC)
    ids = [
        (await store.add(ALICE, f"fact number {i}", at=t0 + timedelta(minutes=i))).id
        for i in range(5)
    ]
    page1 = await store.list(ALICE, limit=2)
    page2 = await store.list(ALICE, limit=2, offset=2)
    page3 = await store.list(ALICE, limit=2, offset=4)
    assert [m.id for m in page1 + page2 + page3] == ids


async def test_update_edits_in_place_and_records_history(store):
    m = await store.add(ALICE, "Drinks coffee")
    updated = await store.update(ALICE, m.id, text="Drinks tea", metadata={"k": 1})
    assert updated is not None and updated.id == m.id
    got = await store.get(ALICE, m.id)
    assert got is not None and got.text == "Drinks tea" and got.metadata == {"k": 1}
    events = [(h.event, h.old_text, h.new_text) for h in await store.history(ALICE, m.id)]
    assert events == [("ADD", None, "Drinks coffee"), ("UPDATE", "Drinks coffee", "Drinks tea")]
    # The vector followed the text: the new text is found by search.
    hits = await store.search(ALICE, "Drinks tea", min_score=0.5)
    assert [h.memory.id for h in hits] == [m.id]


async def test_update_and_delete_of_another_users_memory_do_nothing(store):
    m = await store.add(ALICE, "Secret of alice")
    assert await store.update(BOB, m.id, text="hijacked") is None
    assert await store.delete(BOB, m.id) is False
    assert await store.get(BOB, m.id) is None
    got = await store.get(ALICE, m.id)
    assert got is not None and got.text == "Secret of alice"


async def test_delete_removes_the_row_and_keeps_a_history_entry(store):
    m = await store.add(ALICE, "Owns a bike")
    assert await store.delete(ALICE, m.id) is True
    assert await store.get(ALICE, m.id) is None
    assert await store.delete(ALICE, m.id) is False
    events = [(h.event, h.old_text) for h in await store.history(ALICE, m.id)]
    assert events == [("ADD", None), ("DELETE", "Owns a bike")]


async def test_delete_all_erases_memories_and_history_of_that_user_only(store):
    a = await store.add(ALICE, "Alice fact one")
    await store.add(ALICE, "Alice fact two")
    b = await store.add(BOB, "Bob fact")
    assert await store.delete_all(ALICE) == 2
    assert await store.count(ALICE) == 0
    assert await store.history(ALICE, a.id) == []
    assert await store.get(BOB, b.id) is not None
    assert len(await store.history(BOB, b.id)) == 1


async def test_agent_scope_narrows_reads_and_delete_all(store):
    user_wide = await store.add(ALICE, "Speaks French")
    coach = Scope(user_id="alice", agent_id="coach")
    tutor = Scope(user_id="alice", agent_id="tutor")
    c = await store.add(coach, "Runs 5k on Sundays")
    await store.add(tutor, "Studies algebra")
    assert [m.id for m in await store.list(coach)] == [c.id]
    assert await store.get(coach, user_wide.id) is None
    assert await store.count(ALICE) == 3
    assert await store.delete_all(coach) == 1
    assert await store.count(ALICE) == 2


async def test_users_and_count_report_active_memories(store):
    await store.add(ALICE, "one")
    await store.add(ALICE, "two")
    await store.add(BOB, "three")
    assert await store.users() == [("alice", 2), ("bob", 1)]
    assert await store.count() == 3
    assert await store.count(BOB) == 1


async def test_data_survives_reopen(tmp_path, memory_config):
    path = tmp_path / "db"
    s = await MemoryStore.open(path, HashEmbedder(), memory_config)
    m = await s.add(ALICE, "Persistent fact")
    await s.close()
    s = await MemoryStore.open(path, HashEmbedder(), memory_config)
    try:
        got = await s.get(ALICE, m.id)
        assert got is not None and got.text == "Persistent fact"
        assert await s.ready()
    finally:
        await s.close()
    assert not await s.ready()


@pytest.mark.parametrize(
    ("name", "dims"), [("another-model", 256), ("test-hash", 128)], ids=["name", "dimension"]
)
async def test_opening_with_another_embedder_is_a_clear_error(tmp_path, memory_config, name, dims):
    path = tmp_path / "db"
    s = await MemoryStore.open(path, HashEmbedder(), memory_config)
    await s.add(ALICE, "A fact")
    await s.close()
    with pytest.raises(EmbedderMismatch, match=r"test-hash.*256 dimensions"):
        await MemoryStore.open(path, HashEmbedder(dimensions=dims, name=name), memory_config)


async def test_optimize_keeps_every_row_and_index_usable(store):
    for i in range(30):
        await store.add(ALICE, f"fact {i} about topic {i % 3}")
    await store.optimize()
    assert await store.count(ALICE) == 30
    hits = await store.search(ALICE, "fact 7 about topic 1", min_score=0.0)
    assert hits[0].memory.text == "fact 7 about topic 1"
    assert store.writes_since_optimize == 0
