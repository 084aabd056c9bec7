"""Search: vector + full-text fused by rank, Chinese n-grams, fresh rows,
cut-off, limits, the real local embedder across languages, and the scope
cache answering like LanceDB (memory/search/searcher.py)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime

import numpy as np
import pytest

from memory.config import MaintenanceConfig, MemoryConfig, SearchConfig
from memory.models import Memory, Operation, Scope
from memory.store import MemoryStore
from tests.memory.helpers import QUERIES, HashEmbedder, texts

ALICE = Scope(user_id="alice")
BOB = Scope(user_id="bob")

DISTRACTORS = [
    "Enjoys hiking in the mountains",
    "Works as a nurse",
    "Has two brothers",
    "Allergic to peanuts",
    "Plays the violin",
    "Drives an electric car",
    "喜欢喝咖啡",
    "每天早上跑步",
    "Favourite colour is green",
    "Reads science fiction",
    "Birthday is in October",
    "正在学习日语",
]


class ConstantEmbedder(HashEmbedder):
    """Every text gets the same vector: the vector side cannot tell rows
    apart, so whatever ranks first got there through full-text search."""

    async def embed(self, texts: Sequence[str]) -> np.ndarray:
        out = np.zeros((len(texts), self.dimensions), dtype=np.float32)
        out[:, 0] = 1.0
        return out


@pytest.fixture
async def fts_store(tmp_path, memory_config):
    store = await MemoryStore.open(tmp_path / "fts", ConstantEmbedder(), memory_config)
    for text in DISTRACTORS:
        await store.add(ALICE, text)
    yield store
    await store.close()


@pytest.mark.parametrize("query", ["上海", "海", "Shanghai", "shanghai"])
async def test_full_text_finds_short_chinese_and_english_words(fts_store, query):
    await fts_store.add(ALICE, "我住在上海 (lives in Shanghai)")
    hits = await fts_store.search(ALICE, query, limit=3)
    assert hits[0].memory.text == "我住在上海 (lives in Shanghai)"


async def test_full_text_covers_rows_added_before_and_after_optimize(fts_store):
    await fts_store.add(ALICE, "养了一只猫")
    await fts_store.optimize()
    await fts_store.add(ALICE, "搬到了北京")
    assert (await fts_store.search(ALICE, "猫", limit=1))[0].memory.text == "养了一只猫"
    assert (await fts_store.search(ALICE, "北京", limit=1))[0].memory.text == "搬到了北京"


async def test_the_full_text_index_sees_one_and_two_character_tokens(fts_store):
    tokens = {t.text for t in await fts_store._memories.tokenize("上海", column="text")}
    assert {"上", "海", "上海"} <= tokens


async def test_search_only_returns_the_scopes_memories(fts_store):
    await fts_store.add(BOB, "Bob lives in Shanghai")
    hits = await fts_store.search(ALICE, "Shanghai", limit=20)
    assert all(h.memory.user_id == "alice" for h in hits)
    assert "Bob lives in Shanghai" not in {h.memory.text for h in hits}


async def test_unrelated_memories_fall_below_the_cut_off(store):
    await store.add(ALICE, "Enjoys hiking in the mountains")
    assert await store.search(ALICE, "xylophone quartz zebra") == []
    assert await store.search(ALICE, "xylophone quartz zebra", min_score=-1.0) != []


async def test_limit_and_ranking_by_relevance(store):
    for text in DISTRACTORS:
        await store.add(ALICE, text)
    hits = await store.search(ALICE, "Plays the violin", limit=2, min_score=-1)
    assert len(hits) == 2
    assert hits[0].memory.text == "Plays the violin"
    assert hits[0].score >= hits[1].score
    assert hits[0].similarity == pytest.approx(1.0, abs=1e-4)
    assert await store.search(ALICE, "Plays the violin", limit=0) == []


async def test_vector_only_search_scores_by_cosine(tmp_path):
    config = MemoryConfig(search=SearchConfig(hybrid=False))
    store = await MemoryStore.open(tmp_path / "v", HashEmbedder(), config)
    try:
        await store.add(ALICE, "Plays the violin")
        [hit] = await store.search(ALICE, "Plays the violin")
        assert hit.score == hit.similarity == pytest.approx(1.0, abs=1e-4)
    finally:
        await store.close()


async def test_superseded_facts_are_searchable_only_on_request(store):
    old = await store.add(ALICE, "Lives in Paris")
    await store.apply(
        ALICE,
        [Operation(op="UPDATE", memory_id=old.id, text="Lives in Rome")],
        source="j",
        actor="extractor",
        at=datetime.now(UTC),
    )
    assert [h.memory.text for h in await store.search(ALICE, "Lives in Paris")] == ["Lives in Rome"]
    both = await store.search(ALICE, "Lives in Paris", include_superseded=True)
    assert [h.memory.text for h in both][:1] == ["Lives in Paris"]


async def test_related_returns_the_k_nearest_active_memories(store):
    for text in DISTRACTORS:
        await store.add(ALICE, text)
    await store.add(BOB, "Plays the violin in an orchestra")
    related = await store.related(ALICE, "Plays the violin in an orchestra", 3)
    assert len(related) == 3
    assert related[0].text == "Plays the violin"
    assert all(m.user_id == "alice" for m in related)


async def test_a_vector_index_is_built_once_the_table_is_large_enough(tmp_path):
    config = MemoryConfig(maintenance=MaintenanceConfig(vector_index_min_rows=300))
    store = await MemoryStore.open(tmp_path / "big", HashEmbedder(dimensions=32), config)
    try:
        scope = Scope(user_id="u")
        ops = [Operation(op="ADD", text=f"fact number {i} about thing {i * 7}") for i in range(320)]
        await store.apply(scope, ops, source="bulk", actor="import", at=datetime.now(UTC))
        await store.optimize()
        indexed = {tuple(i.columns) for i in await store._memories.list_indices()}
        assert ("vector",) in indexed
        hits = await store.search(scope, "fact number 42 about thing 294", min_score=0.5)
        assert hits[0].memory.text == "fact number 42 about thing 294"
    finally:
        await store.close()


# ---------- the real default embedder ----------

FACTS = [
    "我住在上海",
    "My daughter is called Emma",
    "我对花生过敏",
    "I work as a software engineer at a bank",
    "我最喜欢的运动是游泳",
    "I have a golden retriever named Max",
]


@pytest.fixture
async def real_store(tmp_path, local_embedder, memory_config):
    store = await MemoryStore.open(tmp_path / "real", local_embedder, memory_config)
    for fact in FACTS:
        await store.add(ALICE, fact)
    yield store
    await store.close()


@pytest.mark.parametrize(
    ("query", "fact"),
    [
        ("Where do I live?", "我住在上海"),
        ("What am I allergic to?", "我对花生过敏"),
        ("我的女儿叫什么名字？", "My daughter is called Emma"),  # noqa: RUF001
        ("我养了什么宠物？", "I have a golden retriever named Max"),  # noqa: RUF001
        ("我喜欢什么运动", "我最喜欢的运动是游泳"),
        ("What is my job?", "I work as a software engineer at a bank"),
    ],
)
async def test_the_local_embedder_answers_across_languages(real_store, query, fact):
    hits = await real_store.search(ALICE, query, limit=1)
    assert [h.memory.text for h in hits] == [fact]


# ---------- through the scope cache ----------


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


async def test_related_uses_the_cache_and_stays_in_scope(pair):
    fast, _ = pair
    related = await fast.related(ALICE, "Plays the violin in Shanghai", 2)
    assert related[0].text == "Plays the violin"
    assert all(m.user_id == "alice" for m in related)
