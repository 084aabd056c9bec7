"""The recent-search memo (memory/search/recent.py): `related` reuses the top
list of a search with the same text, or an embedding handed over."""

from __future__ import annotations

from memory.store import MemoryStore
from tests.memory.helpers import ALICE, BOB, HashEmbedder, cached


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
