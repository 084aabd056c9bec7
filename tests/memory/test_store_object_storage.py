"""The memory tables on object storage (`storage.uri`), against moto's S3
server (tests/s3.py): the store works as the local one does, keeps its
coordination files (lock, change log) in the local directory, and replicas
sharing one prefix see each other's writes within `refresh_seconds`, while a
search served from the cache makes no request to the store."""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
from scripted_llm import ScriptedLLM, ops

from memory.config import (
    LLMConfig,
    MemoryConfig,
    QueueConfig,
    SearchConfig,
    SpoolConfig,
    StorageConfig,
)
from memory.engine import STORE_DIR, MemoryEngine
from memory.errors import TRANSIENT, StorageUnavailable
from memory.models import Exchange
from memory.schema import HISTORY, MEMORIES
from memory.search import coherence
from memory.store import MemoryStore
from memory.store.commit import CHANGES_FILE, WRITES_LOCK
from tests.memory.helpers import ALICE, ALICE_BOT, BOB, FACTS, HashEmbedder, cached, texts
from tests.s3 import CountingProxy, S3Prefix

REFRESH = 0.2


def _storage(prefix: S3Prefix, refresh: float = REFRESH, **options: str) -> StorageConfig:
    return StorageConfig(
        uri=prefix.uri, options={**prefix.options, **options}, refresh_seconds=refresh
    )


async def _open(local: Path, prefix: S3Prefix, refresh: float = REFRESH, **options: str):
    return await MemoryStore.open(
        local, HashEmbedder(), cached(), storage=_storage(prefix, refresh, **options)
    )


async def _eventually(check, *, within: float = 5.0) -> float:
    """Seconds until `check()` (async) is true; fails after `within`."""
    start = time.monotonic()
    while not await check():
        assert time.monotonic() - start < within, "not seen in time"
        await asyncio.sleep(0.02)
    return time.monotonic() - start


async def test_store_on_s3_works_like_the_local_one(tmp_path, s3_prefix):
    store = await _open(tmp_path / "local", s3_prefix)
    try:
        for text in FACTS:
            await store.add(ALICE, text)
        await store.add(BOB, "Plays the violin in Shanghai")
        bot = await store.add(ALICE_BOT, "Bot fact about Korean drums")

        assert (await texts(store, ALICE, "violin"))[0] == "Plays the violin"
        assert (await texts(store, BOB, "violin")) == ["Plays the violin in Shanghai"]
        assert "Bot fact about Korean drums" not in await texts(store, BOB, "Korean drums")
        assert (await texts(store, ALICE_BOT, "Korean drums"))[0] == bot.text
        assert await store.count(ALICE) == len(FACTS) + 1
        assert await store.count(BOB) == 1

        nurse = next(m for m in await store.list(ALICE) if m.text == "Works as a nurse in Lyon")
        await store.update(ALICE, nurse.id, text="Works as a doctor in Lyon")
        assert (await texts(store, ALICE, "doctor"))[0] == "Works as a doctor in Lyon"
        assert await store.update(BOB, nurse.id, text="hijacked") is None  # not Bob's
        assert await store.delete(BOB, nurse.id) is False
        assert await store.delete(ALICE, nurse.id) is True
        assert await store.get(ALICE, nurse.id) is None
        assert "Works as a doctor in Lyon" not in await texts(store, ALICE, "doctor Lyon")
        events = [e.event for e in await store.history(ALICE, nurse.id)]
        assert events == ["ADD", "UPDATE", "DELETE"]

        # Straight through LanceDB (no cache) the same answers.
        plain = await MemoryStore.open(
            tmp_path / "plain",
            HashEmbedder(),
            MemoryConfig(search=SearchConfig(cache_bytes=0, min_score=-1.0)),
            storage=_storage(s3_prefix),
        )
        try:
            assert await texts(plain, ALICE, "violin") == await texts(store, ALICE, "violin")
            assert await texts(plain, BOB, "violin") == ["Plays the violin in Shanghai"]
        finally:
            await plain.close()
        await store.optimize()
        assert (await texts(store, ALICE, "violin"))[0] == "Plays the violin"
    finally:
        await store.close()

    # Only the tables are in the bucket; the lock and the change log are local.
    keys = s3_prefix.object_keys()
    assert keys
    assert {k.split("/", 1)[0] for k in keys} == {f"{MEMORIES}.lance", f"{HISTORY}.lance"}
    local = tmp_path / "local"
    assert (local / CHANGES_FILE).exists()
    assert (local / WRITES_LOCK).exists()
    assert not list(local.glob("*.lance"))


async def test_replicas_see_each_others_writes_within_the_refresh(tmp_path, s3_prefix):
    """Two machines (separate local dirs, so separate change logs) on one
    prefix: B's cached search finds A's add, update and delete within about
    `refresh_seconds`, although nothing tells B which user changed."""
    a = await _open(tmp_path / "a", s3_prefix)
    b = await _open(tmp_path / "b", s3_prefix)
    try:
        await a.add(ALICE, "Plays the violin")
        assert await _eventually(lambda: _has(b, "violin", "Plays the violin")) >= 0
        assert b._cache is not None and b._cache.peek(ALICE.key) is not None

        korean = await a.add(ALICE, "Speaks Korean")
        added = await _eventually(lambda: _has(b, "Korean", "Speaks Korean"))

        await a.update(ALICE, korean.id, text="Speaks Korean and Japanese")
        updated = await _eventually(lambda: _has(b, "Japanese", "Speaks Korean and Japanese"))

        await a.delete(ALICE, korean.id)
        deleted = await _eventually(lambda: _lacks(b, "Japanese", "Speaks Korean and Japanese"))

        # The refresh plus a check and a reload from S3: under the grace a
        # version gets that a local writer has not logged yet (a second).
        print(f"seen after {added:.3f} / {updated:.3f} / {deleted:.3f} s")
        for seconds in (added, updated, deleted):
            assert seconds < coherence._UNLOGGED_GRACE, (added, updated, deleted)
        # And B's writes reach A the same way.
        await b.add(BOB, "Plays the drums")
        await _eventually(lambda: _has(a, "drums", "Plays the drums", scope=BOB))
    finally:
        await b.close()
        await a.close()


async def test_replicas_sharing_a_postgresql_log_reread_only_what_another_changed(
    tmp_path, s3_prefix, postgres_url
):
    """With the change log in the queue's database, B follows A's write by
    re-reading the rows it changed: the users A did not touch stay cached."""

    async def replica(name: str) -> MemoryStore:
        return await MemoryStore.open(
            tmp_path / name,
            HashEmbedder(),
            cached(),
            storage=_storage(s3_prefix),
            queue_url=postgres_url,
        )

    a, b = await replica("a"), await replica("b")
    try:
        assert b._changes.shared
        await b.add(BOB, "Plays the drums")
        await _has(b, "drums", "Plays the drums", scope=BOB)
        assert b._cache is not None
        bob_entry = b._cache.peek(BOB.key)
        assert bob_entry is not None
        await a.add(ALICE, "Plays the violin")
        await _eventually(lambda: _has(b, "violin", "Plays the violin"))
        assert b._cache.peek(BOB.key) is bob_entry  # kept, not reloaded
        # The log is A's and B's: nothing of it in their local directories.
        assert not (tmp_path / "a" / CHANGES_FILE).exists()
    finally:
        await b.close()
        await a.close()


async def _has(store: MemoryStore, query: str, text: str, scope=ALICE) -> bool:
    return text in await texts(store, scope, query)


async def _lacks(store: MemoryStore, query: str, text: str) -> bool:
    return not await _has(store, query, text)


async def test_a_cached_search_makes_no_request_between_refreshes(tmp_path, s3_prefix):
    """Between two version checks a search served from the cache costs no
    object-store request; once `refresh_seconds` passed, one check (a LIST)
    goes out. With `refresh_seconds: 0` every search lists the table."""
    writer = await _open(tmp_path / "w", s3_prefix)
    proxy = CountingProxy(s3_prefix.server.endpoint)
    refresh = 1.0
    reader = await _open(tmp_path / "r", s3_prefix, refresh=refresh, endpoint=proxy.endpoint)
    eager = await _open(tmp_path / "e", s3_prefix, refresh=0.0, endpoint=proxy.endpoint)
    try:
        for text in FACTS[:4]:
            await writer.add(ALICE, text)
        # Loaded and followed (the reader opened before these writes).
        await _eventually(lambda: _has(reader, "violin", "Plays the violin"))
        await asyncio.sleep(0.05)  # the check that saw them may still be finishing
        checks = 0
        version = reader._memories.version

        async def counted():
            nonlocal checks
            checks += 1
            return await version()

        reader._memories.version = counted
        proxy.requests.clear()
        searches = 0
        # Before the next check is due (bounded: a check per search moves it).
        while searches < 40 and time.monotonic() < reader._fresh_until - 0.1:
            assert (await texts(reader, ALICE, "violin"))[0] == "Plays the violin"
            searches += 1
        assert searches >= 10
        assert proxy.requests == []
        assert checks == 0  # not even LanceDB's own (free) version lookup

        await asyncio.sleep(reader._fresh_until - time.monotonic() + 0.05)
        await texts(reader, ALICE, "violin")  # due: a check starts in the background
        await _eventually(lambda: _listed(proxy))
        assert checks == 1

        # Without the cache, LanceDB's own consistency check is bounded alike
        # (a long bound: five searches on a loaded machine can take a second).
        plain = await MemoryStore.open(
            tmp_path / "p",
            HashEmbedder(),
            MemoryConfig(search=SearchConfig(cache_bytes=0, min_score=-1.0)),
            storage=_storage(s3_prefix, 30.0, endpoint=proxy.endpoint),
        )
        try:
            await texts(plain, ALICE, "violin")
            proxy.requests.clear()
            for _ in range(5):
                assert (await texts(plain, ALICE, "violin"))[0] == "Plays the violin"
            assert not await _listed(proxy)
        finally:
            await plain.close()

        await texts(eager, ALICE, "violin")
        proxy.requests.clear()
        for _ in range(3):
            await texts(eager, ALICE, "violin")
        assert sum(1 for method, path in proxy.requests if "list-type=2" in path) >= 3
    finally:
        await eager.close()
        await reader.close()
        await writer.close()
        proxy.close()


async def _listed(proxy: CountingProxy) -> bool:
    return any("list-type=2" in path for _, path in proxy.requests)


async def test_a_search_after_a_long_idle_waits_for_the_check(tmp_path, s3_prefix):
    """Past twice the refresh with no search, the next one does not answer
    from the old cache: staleness stays bounded when traffic is sparse."""
    a = await _open(tmp_path / "a", s3_prefix)
    b = await _open(tmp_path / "b", s3_prefix)
    try:
        await a.add(ALICE, "Plays the violin")
        await _eventually(lambda: _has(b, "violin", "Plays the violin"))
        await a.add(ALICE, "Speaks Korean")
        await asyncio.sleep(2 * REFRESH + 0.1)
        assert "Speaks Korean" in await texts(b, ALICE, "Korean")  # the first search
    finally:
        await b.close()
        await a.close()


async def test_an_unreachable_store_is_transient_and_keeps_its_secrets(tmp_path, s3_prefix, caplog):
    """Opening against an object store that does not answer raises a
    transient error (the gateway serves chat without memory and retries),
    whose text names neither the options' secrets nor a URI's credentials."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    secret = "s3cr3t-value-9f2c"
    storage = StorageConfig(
        uri=f"s3://{s3_prefix.prefix}-bucket/x",
        options={
            **s3_prefix.options,
            "endpoint": dead,
            "aws_secret_access_key": secret,
            "client_max_retries": "0",
        },
    )
    caplog.set_level(logging.DEBUG)
    with pytest.raises(StorageUnavailable) as raised:
        await MemoryStore.open(tmp_path / "local", HashEmbedder(), cached(), storage=storage)
    assert isinstance(raised.value, TRANSIENT)
    assert "object store at s3://" in str(raised.value)
    assert secret not in str(raised.value) and secret not in caplog.text
    # The local directory for the lock and the change log is there already.
    assert (tmp_path / "local").is_dir()


async def test_a_store_with_a_secret_logs_none_of_it(tmp_path, s3_prefix, caplog):
    secret = "s3cr3t-value-1a7d"  # moto does not check signatures
    caplog.set_level(logging.DEBUG)
    store = await _open(tmp_path / "local", s3_prefix, aws_secret_access_key=secret)
    try:
        await store.add(ALICE, "Plays the violin")
        assert (await texts(store, ALICE, "violin"))[0] == "Plays the violin"
        assert secret not in repr(store._location)
    finally:
        await store.close()
    assert secret not in caplog.text


async def test_the_engine_opens_its_tables_at_the_uri_and_the_rest_locally(tmp_path, s3_prefix):
    """`MemoryEngine.open(storage=...)`: tables in the bucket; the lock, the
    change log and the spool in the data dir. An unreachable store is an
    outage to wait out (TRANSIENT), as the gateway's start-up expects."""
    data_dir = tmp_path / "data"
    engine = await MemoryEngine.open(
        cached(), data_dir, storage=_storage(s3_prefix), embedder=HashEmbedder()
    )
    try:
        await engine.store.add(ALICE, "Plays the violin")
        assert (await texts(engine.store, ALICE, "violin")) == ["Plays the violin"]
    finally:
        await engine.close()
    assert {k.split("/", 1)[0] for k in s3_prefix.object_keys()} == {
        f"{MEMORIES}.lance",
        f"{HISTORY}.lance",
    }
    local = data_dir / STORE_DIR
    assert (local / CHANGES_FILE).exists() and not list(local.glob("*.lance"))

    dead = StorageConfig(
        uri=s3_prefix.uri,
        options={**s3_prefix.options, "endpoint": "http://127.0.0.1:9", "client_max_retries": "0"},
    )
    with pytest.raises(TRANSIENT):
        await MemoryEngine.open(cached(), tmp_path / "other", storage=dead, embedder=HashEmbedder())


async def test_a_job_waits_out_an_object_store_outage_without_spending_its_attempts(
    tmp_path, s3_prefix
):
    """Mid-run, a store that refuses every request is an outage: the job
    waits (`storage_unavailable`, attempts uncounted) however long it lasts,
    where an error of its own would fail it for good after `max_attempts`."""
    proxy = CountingProxy(s3_prefix.server.endpoint)
    llm = ScriptedLLM([ops({"op": "ADD", "text": "Plays the violin"})])
    client = llm.client()
    config = MemoryConfig(
        llm=LLMConfig(api_key="sk-test"),
        spool=SpoolConfig(max_attempts=1, backoff_initial=0.05, backoff_max=0.1),
    )
    storage = _storage(
        s3_prefix, endpoint=proxy.endpoint, client_max_retries="0", client_retry_timeout="1"
    )
    engine = await MemoryEngine.open(
        config,
        tmp_path / "data",
        storage=storage,
        embedder=HashEmbedder(),
        default_base_url="http://llm.test/v1",
        http_client=client,
    )
    try:
        await engine.start()
        proxy.down = True
        job_id = await engine.record_exchange(
            Exchange(
                scope=ALICE,
                messages=[{"role": "user", "content": "I play the violin"}],
                reply="OK",
                at=datetime.now(UTC),
            )
        )

        async def waiting() -> bool:
            info = await engine.spool.get(job_id)
            return info is not None and info.reason == "storage_unavailable"

        await _eventually(waiting, within=30)
        info = await engine.spool.get(job_id)
        assert info.state == "pending" and info.attempts == 0
        proxy.down = False
        assert (await engine.wait(job_id, timeout=30)).state == "done"
        assert await texts(engine.store, ALICE, "violin") == ["Plays the violin"]
    finally:
        await engine.close()
        await client.aclose()
        proxy.close()


async def test_replicas_starting_together_on_an_empty_prefix_all_open(
    tmp_path, s3_prefix, postgres_url
):
    """Three engines sharing a PostgreSQL queue open their store one at a
    time: created at once, the tables' and indices' commits would conflict
    and two of the three fail to start."""
    queue = QueueConfig(url=postgres_url)

    async def replica(name: str) -> MemoryEngine:
        return await MemoryEngine.open(
            cached(),
            tmp_path / name,
            storage=_storage(s3_prefix),
            queue=queue,
            embedder=HashEmbedder(),
        )

    opened = await asyncio.gather(*(replica(f"r{i}") for i in range(3)), return_exceptions=True)
    engines = [e for e in opened if isinstance(e, MemoryEngine)]
    try:
        assert len(engines) == 3, [e for e in opened if not isinstance(e, MemoryEngine)]
        for i, engine in enumerate(engines):
            await engine.store.add(ALICE, f"Fact {i}")

        async def all_seen() -> bool:
            return len(await engines[0].store.list(ALICE)) == 3

        await _eventually(all_seen)
    finally:
        for engine in engines:
            await engine.close()
