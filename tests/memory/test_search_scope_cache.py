"""The LRU of scope indexes (memory/search/scope_cache.py): stale loads are not
cached, writes reach only the entries that can see them, bytes are bounded,
and each scope is cached apart."""

from __future__ import annotations

import numpy as np

from memory.search.scope_cache import ScopeCache
from memory.search.scope_index import ScopeIndex
from memory.store import MemoryStore
from tests.memory.helpers import ALICE, ALICE_BOT, HashEmbedder, cached, row, texts, unit


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
