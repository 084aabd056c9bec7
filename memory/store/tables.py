"""Table lifecycle: connecting, indices, closing, readiness and optimizing.

`MemoryStore.open` creates or opens the tables (memory/schema.py) and calls
`_ensure_indices`; `optimize` (run by maintenance) compacts them under the
exclusive `WRITES_LOCK`, so every version in its span is its own, logged as
changing nothing, and reconnects to let LanceDB's stale file handles go.

The tables live in the local store directory, or at `storage.uri` (object
storage shared by replicas: `TableLocation`); the lock always stays in the
local directory, and so does the change log unless the replicas share one in
the queue's PostgreSQL database. On a shared store another machine may
commit inside an optimize's span, so that span is not logged as unchanged.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import lancedb
from lancedb.index import FTS, BTree, IvfPq

from memory.config import MemoryConfig, StorageConfig
from memory.errors import StorageUnavailable
from memory.filters import unscoped
from memory.locks import locked
from memory.redaction import public_url
from memory.schema import HISTORY, MEMORIES
from memory.store.commit import Commits

log = logging.getLogger(__name__)

# n-grams of 1..3 characters: a one- or two-character Chinese word (猫, 上海) matches.
_FTS_CONFIG = FTS(
    base_tokenizer="ngram",
    ngram_min_length=1,
    ngram_max_length=3,
    lower_case=True,
    ascii_folding=True,
    stem=False,
    remove_stop_words=False,
    max_token_length=None,
)


# What LanceDB's errors say when the object store failed (its Rust `IO` and
# `object_store` errors, surfaced as ValueError or OSError).
_STORE_FAILURE = re.compile(r"\bIO \{|object_store|ObjectStore|store: \"")
_USERINFO = re.compile(r"://[^/@\s]*@")


@dataclass(frozen=True)
class TableLocation:
    """Where LanceDB opens the tables: the local store directory (`uri` unset)
    or `storage.uri`, with its options. `refresh` is None for a local store;
    for a shared one, how stale (seconds) a replica may be about the others'
    writes, the bound that spares a LIST per request."""

    uri: str
    options: Mapping[str, str] = field(default_factory=dict, repr=False)
    refresh: float | None = None

    @classmethod
    def of(cls, local: Path, storage: StorageConfig | None) -> TableLocation:
        if storage is None or storage.uri is None:
            return cls(str(local))
        return cls(storage.uri, dict(storage.options), storage.refresh_seconds)

    @property
    def shared(self) -> bool:
        return self.refresh is not None

    @property
    def local_dir(self) -> Path | None:
        """The directory to create first, when the tables are on this file system."""
        if "://" in self.uri:
            return None
        return Path(self.uri)

    @property
    def public(self) -> str:
        """The URI without credentials or query, for logs (options are never shown)."""
        return public_url(self.uri)


def storage_error(exc: Exception, location: TableLocation) -> Exception:
    """`exc` as a `StorageUnavailable` when it is the object store failing
    (unreachable, refused): opening is then retried rather than given up."""
    if isinstance(exc, StorageUnavailable) or not location.shared:
        return exc
    text = str(exc)
    if not _STORE_FAILURE.search(text):
        return exc
    first = _USERINFO.sub("://", text.splitlines()[0] if text else type(exc).__name__)
    return StorageUnavailable(f"object store at {location.public}: {first[:500]}")


async def connect(location: TableLocation, config: MemoryConfig) -> Any:
    session = lancedb.Session(
        index_cache_size_bytes=config.maintenance.index_cache_bytes,
        metadata_cache_size_bytes=config.maintenance.metadata_cache_bytes,
    )
    if not location.shared:
        consistency = timedelta(seconds=config.maintenance.read_consistency_seconds)
        return await lancedb.connect_async(
            location.uri, session=session, read_consistency_interval=consistency
        )
    # Each consistency check on object storage is a LIST: at most one per
    # `refresh` (the search cache checks no more often either).
    assert location.refresh is not None
    return await lancedb.connect_async(
        location.uri,
        session=session,
        read_consistency_interval=timedelta(seconds=location.refresh),
        storage_options=dict(location.options) or None,
    )


class Tables(Commits):
    """The tables' handles, indices and maintenance."""

    _location: TableLocation

    async def _ensure_indices(self) -> None:
        have = {tuple(i.columns): i.index_type for i in await self._memories.list_indices()}
        if ("text",) not in have:
            await self._memories.create_index("text", config=_FTS_CONFIG)
        for column in ("user_id", "id"):
            if (column,) not in have:
                await self._memories.create_index(column, config=BTree())
        if ("vector",) not in have:
            rows = await self._memories.count_rows(unscoped("index_size"))
            if rows >= self._config.maintenance.vector_index_min_rows:
                await self._memories.create_index("vector", config=IvfPq(distance_type="cosine"))
        have_h = {tuple(i.columns) for i in await self._history.list_indices()}
        for column in ("memory_id", "user_id"):
            if (column,) not in have_h:
                await self._history.create_index(column, config=BTree())

    async def _reconnect(self) -> None:
        """Fresh handles after an optimize. LanceDB's session cache keeps every
        superseded index file open, deleted or not (about 2 descriptors per
        optimize, forever); a new session lets them go. Old handles are
        dropped, not closed: a read still running on them finishes."""
        db = await connect(self._location, self._config)
        memories = await db.open_table(MEMORIES)
        history = await db.open_table(HISTORY)
        self._db, self._memories, self._history = db, memories, history

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        checking = self._checking
        if checking is not None and not checking.done():
            # A background version check (shared store) must not outlive the handles.
            await asyncio.wait([checking])
        async with self._lock:
            self._memories.close()
            self._history.close()
            self._db.close()
            await asyncio.to_thread(self._changes.close)
        self._scorer.shutdown(wait=False)
        self._text_scorer.shutdown(wait=False)

    async def ready(self) -> bool:
        if self._closed:
            return False
        try:
            await self._memories.count_rows(unscoped("ready", ids=[]))
        except Exception:
            log.exception("memory store is not ready")
            return False
        return True

    async def optimize(self) -> None:
        """Compact fragments, fold new rows into the indices, drop old versions."""
        keep = timedelta(seconds=self._config.maintenance.keep_versions_seconds)
        # Exclusive: no process commits while this one optimizes, so every
        # version from here to the end is maintenance's own (compaction, index
        # updates), logged as changing nothing: other processes' caches stay.
        async with self._lock, locked(self._writes_lock):
            # Caught up first; no waiting for a late log in here.
            if self._cache is not None and not await self._check_version():
                self._cache.clear()
            start = await self._memories.version()
            self._own_writes += 1
            try:
                await self._retry(lambda: self._memories.optimize(cleanup_older_than=keep))
                await self._retry(lambda: self._history.optimize(cleanup_older_than=keep))
                await self._ensure_indices()
                await self._reconnect()
            finally:
                end = await self._memories.version()
                if self._location.shared:
                    # Another machine may have committed inside the span: it is
                    # not all ours, so it is left unlogged (this machine's other
                    # processes then drop their caches) and ours is dropped too.
                    if self._cache is not None:
                        self._cache.clear()
                else:
                    ours = range(start + 1, end + 1)
                    try:
                        await asyncio.to_thread(self._changes.record_unchanged, ours)
                    except Exception as exc:
                        # Others then see unlogged versions and drop their caches: safe.
                        log.warning("could not log the maintenance versions: %s", exc)
                if self._cache is not None:
                    self._version = end
                self._own_writes -= 1
            with contextlib.suppress(Exception):
                await asyncio.to_thread(self._changes.prune, end)
            self._writes = 0
            self._optimized_version = end  # nobody commits while we hold the lock
