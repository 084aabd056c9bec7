"""Importing exported memories: into the same user (ids kept on a restore,
idempotent) or into another one (fresh ids, links between the memories
kept), never touching anybody else's rows, never telling a user about other
users' ids, and saying what happened to every line."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from memory.models import ImportResult, Memory, Scope
from memory.store import MemoryStore
from tests.memory.helpers import HashEmbedder

ALICE = Scope(user_id="alice")
BOB = Scope(user_id="bob")
T0 = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)


def line(id: str, text: str = "a fact", *, user: str = "alice", **fields: Any) -> Memory:
    """One memory as an export file of `user` holds it."""
    values: dict[str, Any] = {
        "agent_id": None,
        "session_id": None,
        "metadata": {},
        "created_at": T0,
        "updated_at": T0,
        **fields,
    }
    return Memory(id=id, user_id=user, text=text, **values)


def replaced(old: Memory, by: Memory) -> Memory:
    return Memory(
        **{**_fields(old), "superseded_by": by.id, "superseded_at": T0 + timedelta(days=1)}
    )


def _fields(m: Memory) -> dict[str, Any]:
    return {f: getattr(m, f) for f in m.__struct_fields__}


def reasons(result: ImportResult) -> list[tuple[int, str, str]]:
    return [(i.line, i.id, i.reason) for i in [*result.skipped, *result.failed]]


async def texts(store: MemoryStore, scope: Scope, **kw: Any) -> set[str]:
    return {m.text for m in await store.list(scope, **kw)}


async def test_another_users_export_lands_under_fresh_ids_and_the_original_stays(store):
    a = await store.add(ALICE, "Was born in Lyon", metadata={"src": "chat"}, at=T0)
    b = await store.add(ALICE, "Plays the viola", at=T0)
    exported = await store.export(ALICE)

    result = await store.import_memories(BOB, exported)

    assert result == ImportResult(imported=2)
    bobs = await store.list(BOB)
    assert {m.text for m in bobs} == {"Was born in Lyon", "Plays the viola"}
    assert {m.id for m in bobs}.isdisjoint({a.id, b.id})
    assert all(m.user_id == "bob" for m in bobs)
    lyon = next(m for m in bobs if m.text == "Was born in Lyon")
    assert (lyon.metadata, lyon.created_at) == ({"src": "chat"}, T0)
    assert [h.actor for h in await store.history(BOB, lyon.id)] == ["import"]
    assert await store.list(ALICE) == exported


async def test_importing_another_users_export_twice_adds_nothing_the_second_time(store):
    await store.add(ALICE, "Was born in Lyon")
    exported = await store.export(ALICE)
    await store.import_memories(BOB, exported)
    first = await store.list(BOB)

    again = await store.import_memories(BOB, exported)

    assert again.imported == 0
    assert reasons(again) == [(1, exported[0].id, "already_present")]
    assert await store.list(BOB) == first


async def test_a_restore_into_the_same_user_keeps_ids_and_skips_those_present(
    store, tmp_path, memory_config
):
    m = await store.add(ALICE, "Was born in Lyon", at=T0)
    exported = await store.export(ALICE)
    for keep_ids in (True, False):
        again = await store.import_memories(ALICE, exported, keep_ids=keep_ids)
        assert reasons(again) == [(1, m.id, "already_present")]
    other = await MemoryStore.open(tmp_path / "other", HashEmbedder(), memory_config)
    try:
        restored = await other.import_memories(ALICE, exported, keep_ids=True)
        assert restored == ImportResult(imported=1)
        assert await other.list(ALICE) == exported
    finally:
        await other.close()


async def test_a_replaced_memory_points_at_its_replacements_new_id(store):
    berlin = line("m-berlin", "Lives in Berlin")
    munich = line("m-munich", "Lives in Munich")
    exported = [replaced(berlin, by=munich), munich]

    assert (await store.import_memories(BOB, exported)).imported == 2

    assert await texts(store, BOB) == {"Lives in Munich"}
    rows = {m.text: m for m in await store.list(BOB, include_superseded=True)}
    assert rows["Lives in Berlin"].superseded_by == rows["Lives in Munich"].id
    history = await store.history(BOB, rows["Lives in Munich"].id)
    assert {h.new_text for h in history} == {"Lives in Berlin", "Lives in Munich"}


async def test_a_memory_replaced_by_one_outside_the_import_stays_replaced(store):
    """Dropping the pointer would bring the outdated fact back into every chat
    (active means "replaced by nothing"); it points into the target user's
    ids instead, where the replacement would land if imported later."""
    berlin = line("m-berlin", "Lives in Berlin")
    munich = line("m-munich", "Lives in Munich")

    first = await store.import_memories(BOB, [replaced(berlin, by=munich)])

    assert first.imported == 1
    assert await texts(store, BOB) == set()
    (row,) = await store.list(BOB, include_superseded=True)
    assert row.superseded_by not in (None, "m-munich")

    await store.import_memories(BOB, [munich])
    assert await texts(store, BOB) == {"Lives in Munich"}
    rows = {m.text: m for m in await store.list(BOB, include_superseded=True)}
    assert rows["Lives in Berlin"].superseded_by == rows["Lives in Munich"].id


async def test_a_same_user_pointer_outside_the_import_is_kept(store):
    munich = await store.add(ALICE, "Lives in Munich")
    berlin = line("m-berlin", "Lives in Berlin")

    await store.import_memories(ALICE, [replaced(berlin, by=munich)], keep_ids=True)

    got = await store.get(ALICE, "m-berlin")
    assert got is not None and got.superseded_by == munich.id


async def test_an_id_another_user_has_is_never_overwritten_the_memory_gets_a_fresh_one(store):
    victim = await store.add(BOB, "Bob's private fact")
    forged = line(victim.id, "alice's own fact", user="alice")

    result = await store.import_memories(ALICE, [forged], keep_ids=True)

    assert result == ImportResult(imported=1)
    got = await store.get(BOB, victim.id)
    assert got is not None and got.text == "Bob's private fact"
    assert await store.get(ALICE, victim.id) is None
    assert await texts(store, ALICE) == {"alice's own fact"}
    # Idempotent like any other import.
    again = await store.import_memories(ALICE, [forged], keep_ids=True)
    assert reasons(again) == [(1, victim.id, "already_present")]
    assert await store.count(ALICE) == 1


async def test_without_keep_ids_an_import_gives_the_same_ids_whatever_other_users_hold(
    store, tmp_path, memory_config
):
    """A per-user key imports without `keep_ids`: if its result depended on
    whether another user holds an id, a user could probe for others' ids."""
    victim = await store.add(BOB, "Bob's private fact")
    probes = [line(victim.id, "probe one"), line("no-such-id", "probe two")]
    empty = await MemoryStore.open(tmp_path / "empty", HashEmbedder(), memory_config)
    try:
        for target in (store, empty):
            assert await target.import_memories(ALICE, probes) == ImportResult(imported=2)
        assert {m.id for m in await store.list(ALICE)} == {m.id for m in await empty.list(ALICE)}
        assert {m.id for m in await store.list(ALICE)}.isdisjoint({victim.id, "no-such-id"})
        got = await store.get(BOB, victim.id)
        assert got is not None and got.text == "Bob's private fact"
        again = await store.import_memories(ALICE, probes)
        assert reasons(again) == [
            (1, victim.id, "already_present"),
            (2, "no-such-id", "already_present"),
        ]
    finally:
        await empty.close()


async def test_an_id_squatted_by_another_user_still_lets_the_memory_in(store):
    lyon = line("m-lyon", "Was born in Lyon")
    await store.import_memories(BOB, [lyon])
    (imported,) = await store.list(BOB)
    await store.delete_all(BOB)
    # A restore of mallory's (ids kept) holds the id Bob's import would give
    # that memory; without `keep_ids` nobody can choose an id.
    squat = line(imported.id, "mallory's fact", user="mallory")
    await store.import_memories(Scope(user_id="mallory"), [squat], keep_ids=True)

    assert (await store.import_memories(BOB, [lyon])).imported == 1

    assert await texts(store, BOB) == {"Was born in Lyon"}
    mallorys = await store.get(Scope(user_id="mallory"), imported.id)
    assert mallorys is not None and mallorys.text == "mallory's fact"


async def test_lines_the_store_cannot_hold_fail_and_the_rest_is_imported(store):
    memories = [
        line("ok-1", "Plays the viola"),
        line("blank", "   "),
        line("bad\x00id", "a fact"),
        line("long-agent", "a fact", agent_id="a" * 300),
        line("bad-pointer", "a fact", superseded_by="x\x00y"),
        line("", "a fact"),
    ]

    result = await store.import_memories(ALICE, memories)

    assert result.imported == 1
    assert reasons(result) == [
        (2, "blank", "empty_text"),
        (3, "bad\x00id", "invalid_id"),
        (4, "long-agent", "invalid_id"),
        (5, "bad-pointer", "invalid_id"),
        (6, "", "invalid_id"),
    ]
    assert "agent_id" in result.failed[2].message
    assert await texts(store, ALICE) == {"Plays the viola"}


async def test_an_id_repeated_within_one_import_is_stored_once(store):
    result = await store.import_memories(
        ALICE, [line("m-1", "first"), line("m-1", "second"), line("m-2", "third")]
    )
    assert result.imported == 2
    assert reasons(result) == [(2, "m-1", "duplicate_in_import")]
    assert await texts(store, ALICE) == {"first", "third"}


async def test_the_target_scopes_agent_is_given_to_every_imported_memory(store):
    scope = Scope(user_id="bob", agent_id="tutor")
    await store.import_memories(scope, [line("m-1", "a fact", agent_id="other")])
    assert [m.agent_id for m in await store.list(BOB)] == ["tutor"]


async def test_an_empty_import_does_nothing(store):
    assert await store.import_memories(ALICE, []) == ImportResult()
