"""The in-memory scope cache: same answers as LanceDB, exact after every
write, aware of other processes' writes, bounded by bytes."""

from __future__ import annotations

import asyncio
import math
from datetime import UTC, datetime

import lancedb
import numpy as np
import pytest

from memory.changelog import MAX_IDS, ChangeLog, merged
from memory.config import MemoryConfig, SearchConfig
from memory.locks import FileLock
from memory.models import Memory, Operation, Scope
from memory.search.ngram_index import NgramIndex, ngrams
from memory.search.scope_cache import ScopeCache
from memory.search.scope_index import ScopeIndex
from memory.store import WRITES_LOCK, MemoryStore
from tests.memory.helpers import HashEmbedder

ALICE = Scope(user_id="alice")
ALICE_BOT = Scope(user_id="alice", agent_id="bot")
BOB = Scope(user_id="bob")

FACTS = [
    "Enjoys hiking in the mountains",
    "Works as a nurse in Lyon",
    "Allergic to peanuts",
    "Plays the violin",
    "我住在上海",
    "喜欢喝咖啡",
    "每天早上跑步",
    "Café au lait every morning",
    "Has a golden retriever named Max",
    "Birthday is in October",
]
QUERIES = ["violin", "上海", "咖啡", "cafe", "Where does she work?", "Max the dog", "peanut"]


def uncached() -> MemoryConfig:
    return MemoryConfig(search=SearchConfig(cache_bytes=0, min_score=-1.0))


def cached() -> MemoryConfig:
    return MemoryConfig(search=SearchConfig(min_score=-1.0))


async def texts(store: MemoryStore, scope: Scope, query: str) -> list[str]:
    return [h.memory.text for h in await store.search(scope, query, limit=5)]


# ---------- n-gram BM25 ----------


def test_ngrams_are_folded_like_the_lancedb_index():
    assert set(ngrams("上海")) == {"上", "海", "上海"}
    assert ngrams("Café")["caf"] == 1
    assert ngrams("\uff28\uff29") == ngrams("hi")  # full-width
    assert ngrams("aaa")["a"] == 3


def test_bm25_matches_the_textbook_formula():
    docs = ["red apple", "green apple pie", "blue sky"]
    index = NgramIndex.build(docs)
    scores = index.scores("apple", 3)
    grams = [ngrams(d) for d in docs]
    avg = sum(g.total() for g in grams) / 3
    expected = []
    for g in grams:
        s = 0.0
        for t in ngrams("apple"):
            df = sum(t in h for h in grams)
            if t in g:
                idf = math.log(1 + (3 - df + 0.5) / (df + 0.5))
                s += idf * g[t] * 2.2 / (g[t] + 1.2 * (0.25 + 0.75 * g.total() / avg))
        expected.append(s)
    assert scores == pytest.approx(expected, rel=1e-5)
    assert scores[2] < scores[0]


def test_bm25_statistics_follow_adds_and_removes():
    grown = NgramIndex.build(["red apple"])
    grown.add(1, "green apple pie")
    grown.add(2, "blue sky")
    grown.add(3, "old text")
    grown.remove(3)
    fresh = NgramIndex.build(["red apple", "green apple pie", "blue sky"])
    assert grown.scores("apple pie", 4)[:3] == pytest.approx(fresh.scores("apple pie", 3))


# ---------- the index and the cache ----------


def row(memory_id: str, text: str, user: str = "u", agent: str | None = None) -> dict:
    return {
        "id": memory_id,
        "user_id": user,
        "agent_id": agent,
        "text": text,
        "superseded_by": None,
    }


def unit(seed: int, dims: int = 8) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal(dims).astype(np.float32)
    return v / np.linalg.norm(v)


def test_index_ranks_by_cosine_and_replaces_rows_by_id():
    index = ScopeIndex([row("a", "one"), row("b", "two")], np.stack([unit(1), unit(2)]))
    assert [r["id"] for r, _ in index.nearest(unit(2), 2)] == ["b", "a"]
    index.upsert(row("b", "two again"), unit(3))
    index.upsert(row("b", "two again"), unit(3))
    assert len(index) == 2
    [(best, sim)] = index.nearest(unit(3), 1)
    assert (best["text"], sim) == ("two again", pytest.approx(1.0))
    index.remove(["a", "missing"])
    assert [r["id"] for r, _ in index.nearest(unit(1), 5)] == ["b"]


def test_a_load_that_raced_a_write_is_not_cached():
    cache = ScopeCache(max_bytes=10**9)
    token = cache.token("u")
    cache.apply([{**row("x", "new"), "vector": unit(1)}])
    entry = ScopeIndex([row("a", "one")], np.stack([unit(1)]))
    assert not cache.put(("u", None), entry, token)
    assert cache.put(("u", None), entry, cache.token("u"))
    assert cache.get(("u", None)) is entry


def test_writes_reach_only_the_entries_that_can_see_them():
    cache = ScopeCache(max_bytes=10**9)
    whole = ScopeIndex([row("a", "one")], np.stack([unit(1)]))
    bot = ScopeIndex([], np.zeros((0, 8), np.float32))
    cache.put(("u", None), whole, cache.token("u"))
    cache.put(("u", "bot"), bot, cache.token("u"))
    cache.apply([{**row("b", "two", agent="other"), "vector": unit(2)}])
    assert (len(whole), len(bot)) == (2, 0)
    cache.apply([{**row("a", "one"), "superseded_by": "b", "vector": unit(1)}])
    assert len(whole) == 1


def test_the_cache_evicts_least_recently_used_scopes_beyond_its_bytes():
    entries = {u: ScopeIndex([row("a", "x" * 50, u)], np.stack([unit(1)])) for u in "abc"}
    cache = ScopeCache(max_bytes=2 * entries["a"].nbytes + 1)
    cache.put(("a", None), entries["a"], cache.token("a"))
    cache.put(("b", None), entries["b"], cache.token("b"))
    assert cache.get(("a", None)) is entries["a"]
    cache.put(("c", None), entries["c"], cache.token("c"))
    assert cache.get(("b", None)) is None
    assert cache.get(("a", None)) is entries["a"]
    assert cache.nbytes <= cache.max_bytes


# ---------- through the store ----------


@pytest.fixture
async def pair(tmp_path):
    """The same data searched through the cache and straight through LanceDB."""
    fast = await MemoryStore.open(tmp_path / "m", HashEmbedder(), cached())
    for text in FACTS:
        await fast.add(ALICE, text)
    await fast.add(BOB, "Plays the violin in Shanghai")
    slow = await MemoryStore.open(tmp_path / "m", HashEmbedder(), uncached())
    yield fast, slow
    await slow.close()
    await fast.close()


@pytest.mark.parametrize("query", QUERIES)
async def test_cached_search_answers_like_lancedb(pair, query):
    fast, slow = pair
    got = await fast.search(ALICE, query, limit=5)
    want = await slow.search(ALICE, query, limit=5)
    assert fast._cache is not None and len(fast._cache) == 1
    assert [h.memory for h in got] == [h.memory for h in want]
    assert [h.similarity for h in got] == pytest.approx([h.similarity for h in want], abs=1e-4)


async def test_every_kind_of_write_keeps_the_cache_exact(pair):
    fast, slow = pair
    assert await texts(fast, ALICE, "violin")  # the scope is now cached
    added = await fast.add(ALICE, "Speaks fluent Portuguese")
    assert (await texts(fast, ALICE, "Portuguese"))[0] == "Speaks fluent Portuguese"
    await fast.update(ALICE, added.id, text="Speaks fluent Spanish")
    assert (await texts(fast, ALICE, "Spanish"))[0] == "Speaks fluent Spanish"
    assert "Speaks fluent Portuguese" not in await texts(fast, ALICE, "Portuguese")
    violin = next(m for m in await fast.list(ALICE) if m.text == "Plays the violin")
    await fast.apply(
        ALICE,
        [
            Operation(op="UPDATE", memory_id=violin.id, text="Plays the cello"),
            Operation(op="DELETE", memory_id=added.id),
            Operation(op="ADD", text="Lives near the sea"),
        ],
        source="job-1",
        actor="extractor",
        at=datetime.now(UTC),
    )
    for query in ["violin", "cello", "Spanish", "sea", "上海"]:
        # Same visible memories and best hit; lower ranks may differ by BM25
        # statistics (LanceDB's span all users and its last index build).
        got = await fast.search(ALICE, query, limit=50)
        want = await slow.search(ALICE, query, limit=50)
        assert {h.memory.id for h in got} == {h.memory.id for h in want}
        assert got[0].memory == want[0].memory
    assert "Plays the violin" not in await texts(fast, ALICE, "violin")
    assert await fast.delete(ALICE, violin.id)  # the superseded row: nothing visible changes
    assert (await texts(fast, ALICE, "cello"))[0] == "Plays the cello"
    now = datetime.now(UTC)
    await fast.import_memories(
        ALICE,
        [
            Memory(
                id="imp-1",
                user_id="x",
                agent_id=None,
                session_id=None,
                text="Imported fact",
                metadata={},
                created_at=now,
                updated_at=now,
            )
        ],
    )
    assert (await texts(fast, ALICE, "Imported fact"))[0] == "Imported fact"
    await fast.optimize()
    assert (await texts(fast, ALICE, "Imported fact"))[0] == "Imported fact"
    await fast.delete_all(ALICE)
    assert await fast.search(ALICE, "violin") == []
    assert await texts(fast, BOB, "violin") == ["Plays the violin in Shanghai"]


async def test_related_after_a_search_with_the_same_text_reuses_what_it_found(tmp_path):
    """A chat request searches with its user's turn; its extraction then asks
    for the memories nearest that same turn. While the scope is unchanged the
    search's top list answers, with no embedding and no scan; after a write it
    is computed again."""
    embedder = HashEmbedder()
    store = await MemoryStore.open(tmp_path / "m", embedder, cached())
    try:
        for text in ["Plays the violin", "Lives in Shanghai", "Has a cat", "Likes tea"]:
            await store.add(ALICE, text)
        turn = "I played the violin in Shanghai yesterday"
        await store.search(ALICE, turn)
        embedded = len(embedder.calls)
        reused = await store.related(ALICE, turn, 3)
        assert len(embedder.calls) == embedded  # no embedding: the search's list
        assert store._cache is not None
        entry = store._cache.get(("alice", None))
        assert entry is not None
        vector = (await embedder.embed([turn]))[0]
        assert [m.id for m in reused] == [row["id"] for row, _ in entry.nearest(vector, 3)]

        await store.add(ALICE, "Played the violin in Shanghai at a concert")
        embedded = len(embedder.calls)
        fresh = await store.related(ALICE, turn, 3)
        assert len(embedder.calls) == embedded + 1  # the scope changed: computed again
        assert fresh[0].text == "Played the violin in Shanghai at a concert"
        # Another scope, or another text, never borrows the list.
        assert await store.related(BOB, turn, 3) == []
        embedded = len(embedder.calls)
        await store.related(ALICE, "Something else entirely", 3)
        assert len(embedder.calls) == embedded + 1
    finally:
        await store.close()


async def test_related_with_an_embedding_handed_over_needs_no_embedder(tmp_path):
    """The extraction process gets the embedding of an exchange's turn from
    the serving process whose search computed it (memory/handoff.py)."""
    embedder = HashEmbedder()
    store = await MemoryStore.open(tmp_path / "m", embedder, cached())
    try:
        for text in ["Plays the violin", "Lives in Shanghai", "Has a cat"]:
            await store.add(ALICE, text)
        turn = "I played the violin in Shanghai yesterday"
        vector = (await embedder.embed([turn]))[0]
        want = [m.id for m in await store.related(ALICE, turn, 2)]
        store.expect_vector(turn, vector)
        store.expect_vector("wrong size", vector[:10])  # another embedder's: ignored
        embedded = len(embedder.calls)
        assert [m.id for m in await store.related(ALICE, turn, 2)] == want
        assert len(embedder.calls) == embedded
        await store.related(ALICE, "wrong size", 2)
        assert len(embedder.calls) == embedded + 1
    finally:
        await store.close()


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


async def test_agent_scopes_are_cached_apart(tmp_path):
    store = await MemoryStore.open(tmp_path / "m", HashEmbedder(), cached())
    try:
        await store.add(ALICE, "Plays the violin")
        assert await texts(store, ALICE_BOT, "violin") == []
        await store.add(ALICE_BOT, "Bot fact about violin strings")
        assert await texts(store, ALICE_BOT, "violin") == ["Bot fact about violin strings"]
        assert len(await texts(store, ALICE, "violin")) == 2
    finally:
        await store.close()


async def test_writes_of_another_process_are_noticed(pair):
    fast, other = pair  # two handles on one directory, as two processes would have
    assert "Speaks Korean" not in await texts(fast, ALICE, "Korean")
    await other.add(ALICE, "Speaks Korean")
    assert (await texts(fast, ALICE, "Korean"))[0] == "Speaks Korean"
    [hit] = [h for h in await fast.search(ALICE, "Korean") if h.memory.text == "Speaks Korean"]
    await other.delete(ALICE, hit.memory.id)
    assert "Speaks Korean" not in await texts(fast, ALICE, "Korean")


async def test_related_uses_the_cache_and_stays_in_scope(pair):
    fast, _ = pair
    related = await fast.related(ALICE, "Plays the violin in Shanghai", 2)
    assert related[0].text == "Plays the violin"
    assert all(m.user_id == "alice" for m in related)


# ---------- at scale: stop-grams, merges, Arrow-backed rows ----------


def test_many_adds_score_like_one_build_across_delta_merges():
    docs = [f"fact {i} about 上海 and tea number {i * 7}" for i in range(900)]
    grown = NgramIndex.build(docs[:100])
    for i, text in enumerate(docs[100:], start=100):
        grown.add(i, text)
        if i % 97 == 0:  # queries in between rebuild the delta
            grown.scores("tea 上海", i + 1)
    fresh = NgramIndex.build(docs)
    for query in ["number 63", "上海", "fact 899"]:
        assert grown.scores(query, 900) == pytest.approx(fresh.scores(query, 900), rel=1e-5)


def test_stop_grams_are_skipped_in_large_scopes_only():
    common = [f"the same words, note {i}" for i in range(1200)]
    big = NgramIndex.build(common)
    # Every n-gram of "the" is in every document: nothing left to score.
    assert not big.scores("the", 1200).any()
    # A rare n-gram still scores, and only its documents.
    scores = big.scores("the note 1199", 1200)
    assert scores.argmax() == 1199
    small = NgramIndex.build(common[:10])
    assert small.scores("the", 10).all()


def test_an_index_from_arrow_returns_the_rows_as_dicts():
    import pyarrow as pa

    table = pa.table(
        {
            "id": ["a", "b", "c"],
            "text": ["one", "two", "three"],
            "vector": pa.FixedSizeListArray.from_arrays(
                pa.array(np.stack([unit(1), unit(2), unit(3)]).ravel()), 8
            ),
        }
    )
    index = ScopeIndex.from_arrow(table, 8)
    index.upsert({"id": "d", "text": "four"}, unit(4))
    index.remove(["b"])
    assert [r for r, _ in index.nearest(unit(3), 1)] == [{"id": "c", "text": "three"}]
    found = index.candidates(unit(4), "thr", 5)  # "one" shares no n-gram
    assert found.by_vector[0][0] == {"id": "d", "text": "four"}
    assert {r["id"] for r, _ in found.by_vector} == {"a", "c", "d"}
    assert {r["id"] for r, _, _ in found.by_text} == {"c", "d"}


def test_rows_read_from_arrow_buffers_equal_pyarrows_own_conversion():
    import pyarrow as pa

    at = datetime(2026, 11, 29, 1, 2, 3, 456789, tzinfo=UTC)
    table = pa.table(
        {
            "id": ["x", "a", "b", "c"],
            "text": ["skip", "plain", "accents: café, 上海, emoji 🎻", ""],
            "big": pa.array(["s", "one", None, "three"], type=pa.large_string()),
            "agent_id": ["s", None, "bot", None],
            "created_at": pa.array([at, at, None, datetime(1969, 12, 31, tzinfo=UTC)]),
            "naive": pa.array([at.replace(tzinfo=None)] * 4, type=pa.timestamp("ms")),
            "other": pa.array([1, 2, None, 4]),  # a type the reader leaves to pyarrow
            "vector": pa.FixedSizeListArray.from_arrays(
                pa.array(np.stack([unit(i) for i in range(4)]).ravel()), 8
            ),
        }
    ).slice(1)  # buffers with an offset
    index = ScopeIndex.from_arrow(table, 8)
    want = table.drop_columns(["vector"]).to_pylist()
    got = [dict(r) for r, _ in sorted(index.nearest(unit(0), 3), key=lambda p: p[0]["id"])]
    assert got == want
    assert [type(v) for v in got[0].values()] == [type(v) for v in want[0].values()]


def test_a_row_removed_while_its_search_was_scoring_is_not_returned():
    index = ScopeIndex(
        [row("a", "apple pie"), row("b", "apple tart")], np.stack([unit(1), unit(2)])
    )
    sims, by_vec = index.vector_top(unit(1), 2)
    by_text = index.text_top("apple", 2)
    index.remove(["a"])
    index.upsert(row("c", "apple juice"), unit(3))  # after the product: no similarity for it
    found = index.assemble(sims, by_vec, by_text)
    assert [r["id"] for r, _ in found.by_vector] == ["b"]
    assert [r["id"] for r, _, _ in found.by_text] == ["b"]


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


async def test_maintenance_by_another_process_leaves_the_cache_in_place(tmp_path):
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
        await asyncio.sleep(1.1)  # past the grace an unlogged version would get
        assert len(await texts(first, ALICE, "violins")) == 5
        assert first._cache.get(("alice", None)) is entry  # not dropped
        await maintainer.add(ALICE, "Speaks Korean")
        assert (await texts(first, ALICE, "Korean"))[0] == "Speaks Korean"
        assert first._cache.get(("alice", None)) is entry
    finally:
        await maintainer.close()
        await first.close()


async def test_maintenance_waits_for_a_commit_in_progress_elsewhere(tmp_path):
    """Writers hold the store's write lock shared while they commit and log;
    maintenance takes it exclusively, so no foreign version lands in its span."""
    store = await MemoryStore.open(tmp_path / "m", HashEmbedder(), cached())
    try:
        await store.add(ALICE, "Plays the violin")
        writer = FileLock(tmp_path / "m" / WRITES_LOCK, shared=True)
        assert await writer.acquire()
        optimizing = asyncio.ensure_future(store.optimize())
        await asyncio.sleep(0.3)
        assert not optimizing.done()
        writer.release()
        await asyncio.wait_for(optimizing, 30)
    finally:
        await store.close()


def test_the_change_log_names_rows_up_to_a_bound_then_the_whole_user(tmp_path):
    log = ChangeLog(tmp_path / "changes.sqlite3")
    try:
        log.record(7, {"alice": {"a", "b"}, "bob": None})
        log.record(8, {"alice": {f"m{i}" for i in range(MAX_IDS + 1)}})
        logged = log.logged(1, 10)
        assert logged == {7: {"alice": frozenset({"a", "b"}), "bob": None}, 8: {"alice": None}}
        assert merged({7: logged[7]}) == {"alice": {"a", "b"}, "bob": None}
        assert merged(logged) == {"alice": None, "bob": None}
        log.record_unchanged([9, 10])
        assert log.logged(9, 10) == {9: {}, 10: {}}
    finally:
        log.close()


async def test_a_version_nobody_logged_drops_the_whole_cache_after_a_grace(tmp_path):
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
        # Its writer might log it any moment: waited for a second, no longer.
        await texts(store, BOB, "drums")
        await asyncio.sleep(1.1)
        assert await texts(store, BOB, "drums") == []
    finally:
        await store.close()
