"""The write path groups concurrent work: extraction jobs of different users
share LanceDB writes, spool state changes share commits. Grouping must never
change what ends up stored, mix users up, or let one bad job fail the others."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import pytest

from memory.clipping import search_query
from memory.job_handler import related_query
from memory.models import Exchange, Operation, Scope
from memory.spool import Spool

AT = datetime(2025, 3, 14, 9, 30, tzinfo=UTC)


def add(text):
    return Operation(op="ADD", text=text)


async def texts(store, scope):
    return sorted(m.text for m in await store.list(scope))


async def test_concurrent_jobs_of_many_users_share_writes_and_stay_apart(store):
    users = [Scope(user_id=f"user-{n}") for n in range(12)]
    before = store.writes_since_optimize
    results = await asyncio.gather(
        *(
            store.apply(s, [add(f"Lives in city {n}")], source=f"job-{n}", actor="extractor", at=AT)
            for n, s in enumerate(users)
        )
    )
    for n, (scope, entries) in enumerate(zip(users, results, strict=True)):
        assert [e.new_text for e in entries] == [f"Lives in city {n}"]
        assert all(e.user_id == scope.user_id for e in entries)
        assert await texts(store, scope) == [f"Lives in city {n}"]
    # One rows write and one history write per group, not two per job.
    assert store.writes_since_optimize - before < 2 * len(users)


async def test_a_grouped_job_names_only_its_own_users_rows(store):
    alice, bob = Scope(user_id="alice"), Scope(user_id="bob")
    bobs = await store.add(bob, "Has a dog")
    # Grouped with Bob's job, Alice's job names Bob's row: it must not reach it.
    await asyncio.gather(
        store.apply(
            alice,
            [Operation(op="DELETE", memory_id=bobs.id)],
            source="a1",
            actor="extractor",
            at=AT,
        ),
        store.apply(bob, [add("Has a cat")], source="b1", actor="extractor", at=AT),
    )
    assert await texts(store, bob) == ["Has a cat", "Has a dog"]
    assert await texts(store, alice) == []


async def test_two_jobs_of_one_user_apply_in_order(store):
    alice = Scope(user_id="alice")
    first, second = await asyncio.gather(
        store.apply(alice, [add("Likes tea")], source="j1", actor="extractor", at=AT),
        store.apply(alice, [add("likes tea.")], source="j2", actor="extractor", at=AT),
    )
    assert [e.new_text for e in first] == ["Likes tea"]
    assert second == []  # the duplicate sees the first job's row
    assert await texts(store, alice) == ["Likes tea"]


async def test_a_failing_job_does_not_fail_the_jobs_grouped_with_it(store, monkeypatch):
    insert = store._insert

    async def picky_insert(rows):
        if any(r["text"] == "poison" for r in rows):
            raise RuntimeError("this row cannot be written")
        await insert(rows)

    monkeypatch.setattr(store, "_insert", picky_insert)
    users = [Scope(user_id=f"user-{n}") for n in range(4)]
    outcomes = await asyncio.gather(
        *(
            store.apply(
                s,
                [add("poison" if n == 2 else f"fact {n}")],
                source=f"job-{n}",
                actor="extractor",
                at=AT,
                fresh=True,
            )
            for n, s in enumerate(users)
        ),
        return_exceptions=True,
    )
    assert isinstance(outcomes[2], RuntimeError)
    for n in (0, 1, 3):
        assert [e.new_text for e in outcomes[n]] == [f"fact {n}"]
        assert await texts(store, users[n]) == [f"fact {n}"]
        # Written once, although the group was tried whole and then job by job.
        assert len(await store.history(users[n], outcomes[n][0].memory_id)) == 1


def exchange(user: str, n: int) -> Exchange:
    return Exchange(
        scope=Scope(user_id=user),
        messages=[{"role": "user", "content": f"message {n}"}],
        reply="ok",
        at=AT,
    )


@pytest.fixture
async def spool(tmp_path):
    s = await Spool.open(tmp_path / "spool.sqlite3", lease_seconds=30)
    yield s
    await s.close()


async def test_concurrent_enqueues_are_all_committed_in_order_per_user(spool, tmp_path):
    ids = await asyncio.gather(*(spool.enqueue(exchange(f"u{n % 3}", n)) for n in range(30)))
    assert len(set(ids)) == 30
    # Another connection sees every acknowledged job: each was committed.
    other = await Spool.open(tmp_path / "spool.sqlite3", lease_seconds=30)
    try:
        assert await other.unfinished() == 30
    finally:
        await other.close()
    seen = []
    while (claim := await spool.claim()).job is not None:
        seen.append(claim.job.exchange.messages[0]["content"])
        await spool.complete(claim.job)
    for user in range(3):
        mine = [int(t.split()[1]) for t in seen if int(t.split()[1]) % 3 == user]
        assert mine == sorted(mine)


async def test_a_failing_write_in_a_group_leaves_the_others_committed(spool):
    def broken(db):
        db.execute("INSERT INTO jobs (id) VALUES ('half-written')")  # violates NOT NULL

    results = await asyncio.gather(
        spool.enqueue(exchange("alice", 1)),
        spool._grouped(broken),
        spool.enqueue(exchange("bob", 2)),
        return_exceptions=True,
    )
    assert isinstance(results[1], Exception)
    assert await spool.unfinished() == 2


def test_the_related_memory_query_is_the_users_words_cut_like_a_chats_search():
    long = "x" * 30_000
    e = Exchange(
        scope=Scope(user_id="alice"),
        messages=[
            {"role": "system", "content": "You are a helpful assistant. " * 100},
            {"role": "user", "content": "I moved to Lisbon"},
        ],
        reply="Congratulations on the move!",
        at=AT,
    )
    assert related_query(e) == "I moved to Lisbon"
    e.messages.append({"role": "user", "content": long + " and I like jazz"})
    q = related_query(e)
    assert q == search_query("I moved to Lisbon\n" + long + " and I like jazz")
    assert len(q) < 2100
    assert q.endswith("I like jazz")
