"""Cache coherence (memory/search/coherence.py): the search cache follows
other processes' writes through the change log (memory/changelog.py), in
place where it can, and drops what an unlogged version may have changed."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import lancedb
import pytest

from memory.models import Operation
from memory.search import coherence
from memory.store import MemoryStore
from tests.memory.helpers import ALICE, ALICE_BOT, BOB, QUERIES, HashEmbedder, cached, texts


async def test_concurrent_searches_share_one_table_version_check(pair):
    """Each search first checks the table's version (another process may have
    written); searches running together share one check in flight."""
    fast, _ = pair
    await fast.search(ALICE, "violin")  # cached, and the version known
    reads = 0
    version = fast._memories.version

    async def counted():
        nonlocal reads
        reads += 1
        await asyncio.sleep(0.02)  # a check still in flight when the others start
        return await version()

    fast._memories.version = counted
    await asyncio.gather(*(fast.search(ALICE, q) for q in QUERIES))
    assert reads == 1
    await fast.search(ALICE, "violin")
    await fast.search(ALICE, "cello")
    assert reads == 3  # one after another: each reads afresh


async def test_writes_of_another_process_are_noticed(pair):
    fast, other = pair  # two handles on one directory, as two processes would have
    assert "Speaks Korean" not in await texts(fast, ALICE, "Korean")
    await other.add(ALICE, "Speaks Korean")
    assert (await texts(fast, ALICE, "Korean"))[0] == "Speaks Korean"
    [hit] = [h for h in await fast.search(ALICE, "Korean") if h.memory.text == "Speaks Korean"]
    await other.delete(ALICE, hit.memory.id)
    assert "Speaks Korean" not in await texts(fast, ALICE, "Korean")


async def test_another_process_writing_for_one_user_leaves_the_others_cached(tmp_path):
    """The change log names the users a foreign version touched: only they reload."""
    first = await MemoryStore.open(tmp_path / "m", HashEmbedder(), cached())
    second = await MemoryStore.open(tmp_path / "m", HashEmbedder(), cached())
    try:
        await first.add(ALICE, "Plays the violin")
        await first.add(BOB, "Plays the drums")
        assert await texts(first, ALICE, "violin") and await texts(first, BOB, "drums")
        assert first._cache is not None
        bob_entry = first._cache.get(("bob", None))
        assert bob_entry is not None

        added = await second.add(ALICE, "Speaks Korean")
        assert (await texts(first, ALICE, "Korean"))[0] == "Speaks Korean"
        assert first._cache.get(("bob", None)) is bob_entry  # not reloaded

        await second.delete(ALICE, added.id)
        assert "Speaks Korean" not in await texts(first, ALICE, "Korean")
        assert first._cache.get(("bob", None)) is bob_entry
    finally:
        await second.close()
        await first.close()


async def test_another_process_writing_to_a_cached_user_updates_it_in_place(tmp_path):
    """The change log names the rows: a 10k-memory user is re-read by id, not reloaded."""
    first = await MemoryStore.open(tmp_path / "m", HashEmbedder(), cached())
    second = await MemoryStore.open(tmp_path / "m", HashEmbedder(), cached())
    try:
        violin = await first.add(ALICE, "Plays the violin")
        await first.add(ALICE_BOT, "Bot fact about drums")
        assert await texts(first, ALICE, "violin") and await texts(first, ALICE_BOT, "drums")
        assert first._cache is not None
        entry = first._cache.get(("alice", None))
        bot_entry = first._cache.get(("alice", "bot"))

        korean = await second.add(ALICE, "Speaks Korean")
        await second.update(ALICE, violin.id, text="Plays the cello")
        bot_fact = await second.add(ALICE_BOT, "Bot fact about Korean drums")
        assert (await texts(first, ALICE, "Korean"))[0] == "Speaks Korean"
        assert (await texts(first, ALICE, "cello"))[0] == "Plays the cello"
        assert "Plays the violin" not in await texts(first, ALICE, "violin")
        assert (await texts(first, ALICE_BOT, "Korean drums"))[0] == "Bot fact about Korean drums"
        assert first._cache.get(("alice", None)) is entry  # updated, not reloaded
        assert first._cache.get(("alice", "bot")) is bot_entry

        await second.delete(ALICE, korean.id)
        await second.delete(ALICE_BOT, bot_fact.id)
        assert "Speaks Korean" not in await texts(first, ALICE, "Korean")
        assert "Bot fact about Korean drums" not in await texts(first, ALICE, "Korean drums")
        assert first._cache.get(("alice", None)) is entry

        # Every row of the user (or too many to re-read) means a reload.
        await second.delete_all(ALICE)
        assert await first.search(ALICE, "cello") == []
        assert first._cache.get(("alice", None)) is not entry
    finally:
        await second.close()
        await first.close()


@pytest.fixture
def short_grace(monkeypatch):
    """How long an unlogged version is waited for, shortened from a second."""
    grace = 0.05
    monkeypatch.setattr(coherence, "_UNLOGGED_GRACE", grace)
    return grace


async def test_maintenance_by_another_process_leaves_the_cache_in_place(tmp_path, short_grace):
    """Compaction changes no memory: it is logged as such, and other processes
    keep their cached users instead of reloading them all."""
    first = await MemoryStore.open(tmp_path / "m", HashEmbedder(), cached())
    maintainer = await MemoryStore.open(tmp_path / "m", HashEmbedder(), cached())
    try:
        for i in range(5):
            await maintainer.add(ALICE, f"Fact number {i} about violins")
        assert len(await texts(first, ALICE, "violins")) == 5
        assert first._cache is not None
        entry = first._cache.get(("alice", None))
        await maintainer.optimize()
        await maintainer.add(BOB, "Plays the drums")
        await maintainer.optimize()
        assert len(await texts(first, ALICE, "violins")) == 5
        await asyncio.sleep(2 * short_grace)  # past the grace an unlogged version would get
        assert len(await texts(first, ALICE, "violins")) == 5
        assert first._cache.get(("alice", None)) is entry  # not dropped
        await maintainer.add(ALICE, "Speaks Korean")
        assert (await texts(first, ALICE, "Korean"))[0] == "Speaks Korean"
        assert first._cache.get(("alice", None)) is entry
    finally:
        await maintainer.close()
        await first.close()


async def test_a_version_nobody_logged_drops_the_whole_cache_after_a_grace(tmp_path, short_grace):
    """A writer that died between its commit and its log entry (or any write
    outside the store) leaves a gap: every cached user reloads."""
    store = await MemoryStore.open(tmp_path / "m", HashEmbedder(), cached())
    try:
        await store.add(ALICE, "Plays the violin")
        await store.add(BOB, "Plays the drums")
        assert await texts(store, BOB, "drums")
        victim = (await store.list(BOB))[0]
        db = await lancedb.connect_async(str(tmp_path / "m"))
        raw = await db.open_table("memories")
        await raw.delete(f"id = '{victim.id}'")  # behind the store's back: unlogged
        # Its writer might log it any moment: waited for the grace, no longer.
        assert await texts(store, BOB, "drums")
        await asyncio.sleep(2 * short_grace)
        assert await texts(store, BOB, "drums") == []
    finally:
        await store.close()


async def test_the_duplicate_check_of_a_cached_scope_needs_no_lancedb_read(tmp_path):
    """An extracted fact already stored (same normalized text) is not added
    twice; for a cached scope the writer asks the cache, which follows other
    processes' writes, instead of LanceDB."""
    store = await MemoryStore.open(tmp_path / "m", HashEmbedder(), cached())
    other = await MemoryStore.open(tmp_path / "m", HashEmbedder(), cached())
    try:
        await store.add(ALICE, "Plays the violin")
        await store.search(ALICE, "violin")  # ALICE is cached now
        await other.add(ALICE, "Speaks Korean")  # known to the cache via the change log
        asked: list[str] = []
        read = store._rows_any

        async def spy(filters, **kw):
            asked.extend(filters)
            return await read(filters, **kw)

        store._rows_any = spy  # type: ignore[method-assign]
        now = datetime.now(UTC)
        for i, text in enumerate(["plays the violin.", "Speaks  korean", "Has a cat"]):
            ops = [Operation(op="ADD", text=text)]
            await store.apply(ALICE, ops, source=f"job-{i}", actor="extractor", at=now)
        assert sorted(m.text for m in await store.list(ALICE)) == [
            "Has a cat",
            "Plays the violin",
            "Speaks Korean",
        ]
        assert not any("hash" in f for f in asked)
        # An uncached scope asks LanceDB, with the same outcome.
        await other.add(BOB, "Plays the drums")
        await store.apply(
            BOB,
            [Operation(op="ADD", text="plays the drums")],
            source="job-b",
            actor="extractor",
            at=now,
        )
        assert [m.text for m in await store.list(BOB)] == ["Plays the drums"]
        assert any("hash" in f for f in asked)
    finally:
        await other.close()
        await store.close()
