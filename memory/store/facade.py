"""`MemoryStore`: per-user facts in LanceDB, the `memories` and `history` tables.

The facade: opening the store, and the direct (CRUD) API used by the
management API and the engine. Every read and write is narrowed by
`filters.scope_filter`, the only filter builder. The rest of the store is
built from layers, each its own module, bottom first:

- `memory.search.coherence`, `.recent`, `.searcher`: the search cache, the
  recent-search memo, `search` and `related`;
- `memory.store.reads`: row reads and embedding;
- `memory.store.commit`: the commit protocol (writes, retries, change log);
- `memory.store.tables`: table lifecycle (indices, close, optimize);
- `memory.store.apply`: the grouped apply queue of extraction jobs, whose
  decisions are `memory.store.plan` (pure);
- `memory.store.imports`: `import_memories`.

Rows are built by `memory.rows`.
"""

from __future__ import annotations

import asyncio
import builtins
import uuid
from collections import Counter, OrderedDict
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path
from typing import Any

import msgspec
import pyarrow.compute as pc
from lancedb.query import ColumnOrdering

from memory.changelog import ChangeLog, VersionLog
from memory.config import MemoryConfig, StorageConfig
from memory.embedding import Embedder, EmbedderError, QueryCache
from memory.filters import scope_filter, unscoped
from memory.models import Actor, HistoryEntry, Memory, Scope
from memory.rows import (
    MEMORY_COLUMNS,
    entry_for,
    memory_row,
    normalized_hash,
    now,
    to_entry,
    to_memory,
    utc,
)
from memory.schema import (
    HISTORY,
    MEMORIES,
    EmbedderMismatch,
    check_embedder,
    history_schema,
    memories_schema,
)
from memory.scope import ScopeKey
from memory.search.recent import HANDED_MAX_CHARS, RECENT_SEARCHES, Nearest
from memory.search.scope_cache import ScopeCache
from memory.search.scope_index import ScopeIndex
from memory.store.apply import ApplyRequest
from memory.store.commit import CHANGES_FILE, WRITES_LOCK
from memory.store.imports import Imports
from memory.store.tables import TableLocation, connect, storage_error

_ORDER = [ColumnOrdering(column_name="created_at"), ColumnOrdering(column_name="id")]


class MemoryStore(Imports):
    """The engine's storage. Open with `MemoryStore.open`; the caller owns the
    embedder and closes it after the store."""

    def __init__(
        self,
        db: Any,
        memories: Any,
        history: Any,
        embedder: Embedder,
        config: MemoryConfig,
        *,
        path: Path,
        changes: VersionLog,
        location: TableLocation | None = None,
    ) -> None:
        self._path = path
        # Where the tables are; `path` holds the lock and the change log.
        self._location = location or TableLocation.of(path, None)
        # Shared store: the table's version is checked at most this often.
        self._refresh = self._location.refresh
        self._fresh_until = 0.0
        self._changes = changes
        self._writes_lock = path / WRITES_LOCK
        self._db = db
        self._memories = memories
        self._history = history
        self._embedder = embedder
        self._config = config
        self._schema = memories_schema(embedder.name, embedder.dimensions)
        self._history_schema = history_schema()
        self._lock = asyncio.Lock()
        self._writes = 0
        self._writes_changed = asyncio.Event()
        self._closed = False
        cache_bytes = config.search.cache_bytes
        self._cache = ScopeCache(cache_bytes) if cache_bytes > 0 else None
        self._loading: dict[ScopeKey, asyncio.Future[ScopeIndex]] = {}
        # What recent searches found nearest by cosine, by (scope, query): the
        # extraction of a chat exchange asks `related` for the same text the
        # request searched with, moments later (see `related`).
        self._recent: OrderedDict[tuple[ScopeKey, str], Nearest] = OrderedDict()
        # Embeddings handed over by a serving process for `related` (see `expect_vector`).
        self._handed = QueryCache(RECENT_SEARCHES, max_chars=HANDED_MAX_CHARS)
        self._scorer = ThreadPoolExecutor(1, thread_name_prefix="memory-scoring")
        self._text_scorer = ThreadPoolExecutor(1, thread_name_prefix="memory-text-scoring")
        # The table version the cache reflects; None until first checked.
        # A version check in flight, for searches to share (`_check_version`).
        self._checking: asyncio.Future[bool] | None = None
        self._version: int | None = None
        # Since when a table version nobody logged has been seen (see `_follow`).
        self._unlogged_since: float | None = None
        # The table version right after our last optimize (None: not yet known).
        self._optimized_version: int | None = None
        # While our own write is in flight the version moves under us: searches
        # trust the cache, and the writer checks that only its commit happened.
        self._own_writes = 0
        # Extraction jobs waiting for the group writer (see `apply`).
        self._applies: list[ApplyRequest] = []
        self._applier: asyncio.Future[None] | None = None

    def outage(self, exc: Exception) -> Exception:
        """`exc` as a `StorageUnavailable` when it is the shared object store
        failing mid-run (a job then waits the outage out instead of spending
        its attempts); any other error unchanged."""
        return storage_error(exc, self._location)

    @classmethod
    async def open(
        cls,
        path: Path,
        embedder: Embedder,
        config: MemoryConfig,
        *,
        storage: StorageConfig | None = None,
        queue_url: str | None = None,
    ) -> MemoryStore:
        """Create or open the tables under `path`, or at `storage.uri` when
        set (`path` then holds only this machine's lock and change log); warm
        the embedder. Tables on object storage with a PostgreSQL `queue_url`
        keep their change log in that database, shared by every replica.

        Raises `EmbedderMismatch` when the tables were built with another
        embedder name or dimension, `StorageUnavailable` (transient) when the
        object store cannot be reached.
        """
        warm: Callable[[], Awaitable[None]] | None = getattr(embedder, "warm", None)
        if warm is not None:
            await warm()
        if not embedder.dimensions:
            raise EmbedderError(f"embedder {embedder.name!r} does not know its dimension")
        location = TableLocation.of(Path(path), storage)
        await asyncio.to_thread(Path(path).mkdir, parents=True, exist_ok=True)
        if location.shared and location.local_dir is not None:
            await asyncio.to_thread(location.local_dir.mkdir, parents=True, exist_ok=True)
        try:
            return await cls._open_tables(Path(path), location, embedder, config, queue_url)
        except Exception as exc:
            error = storage_error(exc, location)
            if error is exc:
                raise
            raise error from exc

    @classmethod
    async def _open_tables(
        cls,
        path: Path,
        location: TableLocation,
        embedder: Embedder,
        config: MemoryConfig,
        queue_url: str | None,
    ) -> MemoryStore:
        db = await connect(location, config)
        names = set((await db.list_tables()).tables)
        if MEMORIES in names:
            memories = await db.open_table(MEMORIES)
            try:
                check_embedder(await memories.schema(), embedder.name, embedder.dimensions)
            except EmbedderMismatch:
                memories.close()
                db.close()
                raise
        else:
            schema = memories_schema(embedder.name, embedder.dimensions)
            memories = await db.create_table(MEMORIES, schema=schema, exist_ok=True)
        history = await db.create_table(HISTORY, schema=history_schema(), exist_ok=True)
        changes: VersionLog
        if (
            location.shared
            and queue_url is not None
            and queue_url.startswith(("postgresql://", "postgres://"))
        ):
            from memory.changelog_postgres import PostgresChangeLog

            changes = await asyncio.to_thread(PostgresChangeLog, queue_url)
        else:
            changes = await asyncio.to_thread(ChangeLog, path / CHANGES_FILE)
        store = cls(
            db, memories, history, embedder, config, path=path, changes=changes, location=location
        )
        try:
            await store._ensure_indices()
        except BaseException:
            await store.close()
            raise
        return store

    # ---------- direct API ----------

    async def add(
        self,
        scope: Scope,
        text: str,
        *,
        metadata: dict[str, Any] | None = None,
        source: str | None = None,
        actor: Actor = "api",
        at: datetime | None = None,
    ) -> Memory:
        """Store `text` as given; an active duplicate (same normalized text) is
        returned instead of a second copy."""
        text = text.strip()
        if not text:
            raise ValueError("memory text must not be empty")
        at = utc(at) if at else now()
        digest = normalized_hash(text)
        vector = (await self._embed([text]))[0]
        async with self._lock:
            dupes = await self._rows(
                scope_filter(scope, hashes=[digest], active_only=True), limit=1
            )
            if dupes:
                return to_memory(dupes[0])
            row = memory_row(
                id=str(uuid.uuid4()),
                user_id=scope.user_id,
                agent_id=scope.agent_id,
                session_id=scope.session_id,
                text=text,
                vector=vector,
                metadata=msgspec.json.encode(metadata or {}).decode(),
                created_at=at,
                updated_at=at,
                source=source,
                hash=digest,
            )
            await self._insert([row])
            await self._record([entry_for(row, "ADD", None, text, at, source, actor)])
        return to_memory(row)

    async def get(self, scope: Scope, memory_id: str) -> Memory | None:
        rows = await self._rows(scope_filter(scope, ids=[memory_id]), limit=1)
        return to_memory(rows[0]) if rows else None

    async def list(
        self, scope: Scope, *, limit: int = 100, offset: int = 0, include_superseded: bool = False
    ) -> list[Memory]:
        """Oldest first, stable across pages."""
        rows = (
            await self._memories.query()
            .where(scope_filter(scope, active_only=not include_superseded))
            .select(MEMORY_COLUMNS)
            .order_by(_ORDER)
            .offset(max(0, offset))
            .limit(max(0, limit))
            .to_list()
        )
        return [to_memory(r) for r in rows]

    async def update(
        self,
        scope: Scope,
        memory_id: str,
        *,
        text: str | None = None,
        metadata: dict[str, Any] | None = None,
        actor: Actor = "api",
    ) -> Memory | None:
        """Edit a memory in place (same id); `None` when it is not in `scope`."""
        if text is not None:
            text = text.strip()
            if not text:
                raise ValueError("memory text must not be empty")
        vector = (await self._embed([text]))[0] if text is not None else None
        async with self._lock:
            found = await self._rows_by_ids(scope, [memory_id], vectors=True)
            old = found.get(memory_id)
            if old is None:
                return None
            at = now()
            row = {**old, "updated_at": at}
            if text is not None:
                row.update(text=text, vector=vector, hash=normalized_hash(text))
            if metadata is not None:
                row["metadata"] = msgspec.json.encode(metadata).decode()
            await self._upsert([row])
            await self._record(
                [entry_for(row, "UPDATE", old["text"], row["text"], at, None, actor)]
            )
        return to_memory(row)

    async def delete(self, scope: Scope, memory_id: str, *, actor: Actor = "api") -> bool:
        async with self._lock:
            rows = await self._rows(scope_filter(scope, ids=[memory_id]), limit=1)
            if not rows:
                return False
            await self._record(
                [entry_for(rows[0], "DELETE", rows[0]["text"], None, now(), None, actor)]
            )
            await self._remove(scope, [memory_id])
        return True

    async def delete_all(self, scope: Scope) -> int:
        """Erase the scope's memories and their history ("forget me")."""
        where = scope_filter(scope)
        async with self._lock:
            count = await self._memories.count_rows(where)
            await self._remove(scope)
            await self._retry(lambda: self._history.delete(where))
            self._wrote()
        return count

    async def forget_source(self, scope: Scope, source: str) -> None:
        """Erase what one job wrote (its rows and history entries): its user was
        erased while it was writing, perhaps by another process, whose erase
        may have run before this write landed."""
        async with self._lock:
            rows = await self._rows(scope_filter(scope, source=source))
            if rows:
                await self._remove(scope, [r["id"] for r in rows])
            await self._retry(lambda: self._history.delete(scope_filter(scope, source=source)))
            self._wrote()

    async def history(self, scope: Scope, memory_id: str) -> builtins.list[HistoryEntry]:
        """Oldest first, following the chain of rows this one replaced and the
        rows that replaced it."""
        chain = {memory_id}
        frontier = [memory_id]
        while frontier:
            older = await self._rows(scope_filter(scope, superseded_by=frontier))
            rows = await self._rows(scope_filter(scope, ids=frontier))
            frontier = [r["id"] for r in older if r["id"] not in chain]
            frontier += [
                r["superseded_by"]
                for r in rows
                if r["superseded_by"] and r["superseded_by"] not in chain
            ]
            chain.update(frontier)
        rows = (
            await self._history.query()
            .where(scope_filter(scope, memory_ids=sorted(chain)))
            .to_list()
        )
        rows.sort(key=lambda r: (r["at"], r["event"] != "ADD", r["id"]))
        return [to_entry(r) for r in rows]

    async def export(self, scope: Scope) -> builtins.list[Memory]:
        """Every memory of the scope, superseded ones included, oldest first."""
        rows = (
            await self._memories.query()
            .where(scope_filter(scope))
            .select(MEMORY_COLUMNS)
            .order_by(_ORDER)
            .to_list()
        )
        return [to_memory(r) for r in rows]

    async def users(self) -> builtins.list[tuple[str, int]]:
        """(user_id, active memory count), most memories first."""
        # Counted batch by batch: only the distinct ids are held, not one per row.
        reader = await (
            self._memories.query()
            .where(unscoped("users", active_only=True))
            .select(["user_id"])
            .to_batches()
        )
        counts: Counter[str] = Counter()
        async for batch in reader:
            for c in pc.value_counts(batch.column("user_id")).to_pylist():
                counts[c["values"]] += c["counts"]
        return sorted(counts.items(), key=lambda x: (-x[1], x[0]))

    async def owner(self, memory_id: str) -> str | None:
        """The user holding `memory_id`, whoever it is: for an administrator's
        call that names only an id (the mem0 API), which must then act in that
        user's scope. Never for a per-user caller."""
        rows = (
            await self._memories.query()
            .where(unscoped("id_owner", ids=[memory_id]))
            .select(["user_id"])
            .limit(1)
            .to_list()
        )
        return str(rows[0]["user_id"]) if rows else None

    async def count(self, scope: Scope | None = None) -> int:
        """Active memories of `scope`, or of everyone."""
        where = (
            scope_filter(scope, active_only=True) if scope else unscoped("count", active_only=True)
        )
        return await self._memories.count_rows(where)
