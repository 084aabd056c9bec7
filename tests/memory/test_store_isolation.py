"""Hostile ids: whatever a user or agent id contains, no read or write of one
scope ever sees or touches another's memories."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from memory.models import InvalidScope, Operation, Scope

HOSTILE_IDS = [
    "alice",
    "' OR '1'='1",
    "alice' OR user_id LIKE '%",
    "'; DELETE FROM memories; --",
    "o'brien",
    "\\",
    "back\\slash\\'",
    '"quoted"',
    "%",
    "_",
    "a%",
    "alic_",
    "用户' OR '1'='1",
    "ユーザー",
    "🙂",
    "x" * 256,
    "null",
    ") OR (1=1",
]


@pytest.fixture
async def populated(store):
    ids = {}
    for n, user in enumerate(HOSTILE_IDS):
        m = await store.add(Scope(user_id=user), f"secret number {n} of this user")
        ids[user] = m.id
    return store, ids


async def test_each_user_sees_only_their_own_memories(populated):
    store, ids = populated
    for n, user in enumerate(HOSTILE_IDS):
        scope = Scope(user_id=user)
        own = f"secret number {n} of this user"
        assert [m.text for m in await store.list(scope)] == [own]
        assert [m.text for m in await store.export(scope)] == [own]
        assert await store.count(scope) == 1
        hits = await store.search(scope, "secret number of this user", limit=50, min_score=-1)
        assert [h.memory.text for h in hits] == [own]
        assert [m.text for m in await store.related(scope, "secret", 50)] == [own]
        for other, other_id in ids.items():
            visible = await store.get(scope, other_id)
            assert (visible is not None) == (other == user)


async def test_no_user_can_change_or_delete_another_users_memory(populated):
    store, ids = populated
    for user in HOSTILE_IDS:
        scope = Scope(user_id=user)
        for other, other_id in ids.items():
            if other == user:
                continue
            assert await store.update(scope, other_id, text="tampered") is None
            assert await store.delete(scope, other_id) is False
            assert await store.history(scope, other_id) == []
        ops = [
            Operation(op="UPDATE", memory_id=i, text="tampered")
            for o, i in ids.items()
            if o != user
        ] + [Operation(op="DELETE", memory_id=i) for o, i in ids.items() if o != user]
        assert (
            await store.apply(
                scope, ops, source=f"attack-{user}", actor="extractor", at=datetime.now(UTC)
            )
            == []
        )
    assert await store.count() == len(HOSTILE_IDS)
    assert {t for m in await store.list(Scope(user_id="alice")) for t in [m.text]} == {
        "secret number 0 of this user"
    }


async def test_erasing_one_hostile_user_leaves_everyone_else(populated):
    store, _ = populated
    assert await store.delete_all(Scope(user_id="' OR '1'='1")) == 1
    assert await store.delete_all(Scope(user_id="%")) == 1
    assert await store.count() == len(HOSTILE_IDS) - 2
    assert dict(await store.users()).keys() == set(HOSTILE_IDS) - {"' OR '1'='1", "%"}


async def test_hostile_agent_ids_are_isolated_too(store):
    victim = Scope(user_id="u", agent_id="coach")
    attacker = Scope(user_id="u", agent_id="coach' OR '1'='1")
    await store.add(victim, "coach-only fact")
    assert await store.list(attacker) == []
    assert await store.delete_all(attacker) == 0
    assert await store.count(victim) == 1


@pytest.mark.parametrize("bad", ["", "x" * 257, "nul\x00byte", "new\nline"])
def test_ids_that_cannot_name_a_user_are_refused(bad):
    with pytest.raises(InvalidScope):
        Scope(user_id=bad)
