"""Per-user facts in LanceDB: the `memories` and `history` tables.

Every read and write is narrowed by `filters.scope_filter`, the only filter
builder. Writes go through one asyncio lock (LanceDB's update/delete/merge can
conflict with each other) and are retried on commit conflicts. Search fuses
cosine similarity with n-gram full-text search (so Chinese works), see
`memory.fusion`.

Searched scopes are mirrored in memory (`memory.vectors.ScopeCache`): every
write below updates the mirror under the writer lock, and a table version
that moved without us (another process wrote) drops it.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import functools
import hashlib
import logging
import re
import time
import unicodedata
import uuid
from collections import Counter, OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import lancedb
import msgspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from lancedb.index import FTS, BTree, IvfPq
from lancedb.query import ColumnOrdering

from memory.changelog import ChangeLog, Changes, merged
from memory.config import MemoryConfig
from memory.embedding import Embedder, EmbedderError, QueryCache
from memory.filters import build_filter, scope_filter
from memory.fusion import boosted_similarity, reciprocal_rank_fusion
from memory.heap import release_free_memory
from memory.locks import locked
from memory.models import (
    Actor,
    HistoryEntry,
    Hit,
    ImportIssue,
    ImportReason,
    ImportResult,
    InvalidScope,
    Memory,
    Operation,
    Scope,
    validate_id,
)
from memory.schema import (
    HISTORY,
    MEMORIES,
    EmbedderMismatch,
    check_embedder,
    history_schema,
    memories_schema,
)
from memory.vectors import (
    Candidates,
    Key,
    ScopeCache,
    ScopeIndex,
)

__all__ = ["EmbedderMismatch", "MemoryStore", "normalized_hash"]

log = logging.getLogger(__name__)

T = TypeVar("T")

# Deterministic ids of the rows and history entries an extraction job creates.
_ID_NAMESPACE = uuid.UUID("6f1c3a52-4d0e-5b8a-9f57-2b9c1e0d7a41")
# Ids of memories imported from another user (`_imported_id`).
_IMPORT_NAMESPACE = uuid.UUID("0b6f0e3c-5f2a-5d44-8e1b-7c39a2d4f815")
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
# Full-text queries are cut to this many characters: n-gram queries grow with length.
_FTS_QUERY_CHARS = 256
_MEMORY_COLUMNS = [
    "id",
    "user_id",
    "agent_id",
    "session_id",
    "text",
    "metadata",
    "created_at",
    "updated_at",
    "source",
    "superseded_by",
    "superseded_at",
]
_ORDER = [ColumnOrdering(column_name="created_at"), ColumnOrdering(column_name="id")]
_IN_CHUNK = 500
# Jobs written together by the group writer, and scope filters OR-ed in one query.
_APPLY_GROUP = 64
_OR_CHUNK = 64
# Cached scopes smaller than this are scored on the event loop (a thread hop costs more).
_INLINE_ROWS = 2048
# Recent searches' top lists kept for `related` (see there).
_RECENT_SEARCHES = 1024
# Longer than any text `related` is asked about (memory/engine.py, 1 000 characters).
_HANDED_MAX_CHARS = 4096
# Scopes this large leave enough freed heap behind to be worth a malloc_trim.
_TRIM_AFTER_ROWS = 1000
_WRITE_ATTEMPTS = 6
# A version another process committed but has not logged is waited for this
# long (seconds) before the whole search cache is dropped instead.
_UNLOGGED_GRACE = 1.0
# Beside the tables: which users each table version changed (memory/changelog.py).
CHANGES_FILE = "_changes.sqlite3"
# Held shared by every process while it commits to the memories table and logs
# the commit, exclusively by maintenance: the versions in an optimize's span
# are then all its own.
WRITES_LOCK = "_writes.lock"
_SPACE = re.compile(r"\s+")
_TRAILING = ".!?;,\u3002\uff01\uff1f\uff1b\uff0c"  # ASCII and full-width


def normalized_hash(text: str) -> str:
    """sha256 of the text with case, width, whitespace and final punctuation folded."""
    folded = _SPACE.sub(" ", unicodedata.normalize("NFKC", text).casefold()).strip()
    folded = folded.rstrip(_TRAILING).strip()
    return hashlib.sha256(folded.encode()).hexdigest()


def _op_id(source: str, index: int, kind: str) -> str:
    return str(uuid.uuid5(_ID_NAMESPACE, f"{source}:{index}" + (f":{kind}" if kind else "")))


def _now() -> datetime:
    return datetime.now(UTC)


def _utc(at: datetime) -> datetime:
    return at.replace(tzinfo=UTC) if at.tzinfo is None else at.astimezone(UTC)


def _is_conflict(exc: Exception) -> bool:
    text = str(exc).lower()
    return "conflict" in text or "retryable" in text


def _changed(rows: Iterable[Mapping[str, Any]]) -> dict[str, set[str] | None]:
    """The ids each user's rows among `rows` have: what a write of them changed."""
    out: dict[str, set[str] | None] = {}
    for row in rows:
        ids = out.setdefault(row["user_id"], set())
        assert ids is not None
        ids.add(row["id"])
    return out


def _recent_key(scope: Scope, text: str) -> tuple[Key, str]:
    return (scope.user_id, scope.agent_id), text


def _retrieve(future: asyncio.Future[Any]) -> None:
    """Mark a shared future's error as seen: every waiter may have been
    cancelled (a search's deadline), which must not log it as lost."""
    if not future.cancelled():
        future.exception()


def _to_memory(row: Mapping[str, Any]) -> Memory:
    return Memory(
        id=row["id"],
        user_id=row["user_id"],
        agent_id=row["agent_id"],
        session_id=row["session_id"],
        text=row["text"],
        metadata=msgspec.json.decode(row["metadata"]) if row["metadata"] else {},
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        source=row["source"],
        superseded_by=row["superseded_by"],
        superseded_at=row["superseded_at"],
    )


def _to_entry(row: dict[str, Any]) -> HistoryEntry:
    return HistoryEntry(
        id=row["id"],
        memory_id=row["memory_id"],
        user_id=row["user_id"],
        event=row["event"],
        old_text=row["old_text"],
        new_text=row["new_text"],
        at=row["at"],
        source=row["source"],
        actor=row["actor"],
    )


def _op_texts(ops: Sequence[Operation]) -> dict[int, str]:
    """The stripped new text of each ADD and UPDATE, by operation index."""
    return {
        i: op.text.strip()
        for i, op in enumerate(ops)
        if op.op in ("ADD", "UPDATE") and op.text and op.text.strip()
    }


def _in_scope(row: dict[str, Any], scope: Scope) -> bool:
    return row["user_id"] == scope.user_id and (
        scope.agent_id is None or row["agent_id"] == scope.agent_id
    )


def _imported_id(user_id: str, memory_id: str) -> str:
    """The id `memory_id` gets when imported into `user_id`'s memory from
    elsewhere: derived, so a second import finds it. Validated ids hold no
    control character, so the separator keeps ("a:b", "c") apart from ("a", "b:c")."""
    return str(uuid.uuid5(_IMPORT_NAMESPACE, f"{user_id}\x1f{memory_id}"))


def _issue(line: int, m: Memory, reason: ImportReason, message: str) -> ImportIssue:
    return ImportIssue(line=line, id=m.id, reason=reason, message=message)


def _unstorable(m: Memory) -> tuple[ImportReason, str] | None:
    """Why a memory cannot be stored, if it cannot: ids end up in filters
    and scopes, so they must be valid ids."""
    if not m.text.strip():
        return "empty_text", "memory text must not be empty"
    for kind in ("id", "agent_id", "session_id", "superseded_by"):
        value = getattr(m, kind)
        try:
            if value is not None:
                validate_id(kind, value)
        except InvalidScope as exc:
            return "invalid_id", str(exc)
    return None


def _screen(memories: Iterable[Memory], result: ImportResult) -> list[tuple[int, Memory]]:
    """The memories worth planning, with their 1-based position; the others
    are counted in `result` as failed or skipped."""
    accepted: list[tuple[int, Memory]] = []
    seen: set[str] = set()
    for n, m in enumerate(memories, 1):
        if (problem := _unstorable(m)) is not None:
            result.failed.append(_issue(n, m, *problem))
        elif m.id in seen:
            result.skipped.append(_issue(n, m, "duplicate_in_import", "same id as an earlier line"))
        else:
            seen.add(m.id)
            accepted.append((n, m))
    return accepted


def _id_candidates(user_id: str, m: Memory) -> list[str]:
    """The ids a memory may take, in order of preference."""
    derived = _imported_id(user_id, m.id)
    return [m.id, derived] if m.user_id == user_id else [derived]


def _choose_id(user_id: str, m: Memory, owners: Mapping[str, str]) -> tuple[str, bool]:
    """The id the memory gets, and whether the user has it already. An id
    held by another user is passed over; if every candidate is (someone
    chose them on purpose), a random one is taken."""
    for candidate in _id_candidates(user_id, m):
        owner = owners.get(candidate)
        if owner is None:
            return candidate, False
        if owner == user_id:
            return candidate, True
    return str(uuid.uuid4()), False


def _imported_row(
    scope: Scope, m: Memory, memory_id: str, vector: np.ndarray, final: Mapping[str, str]
) -> dict[str, Any]:
    """The row of an imported memory. Its `superseded_by` follows the
    replacement to the id that one got; outside the import it keeps the
    user's own id, or takes the id another user's replacement would get."""
    replacement = m.superseded_by
    if replacement is not None:
        foreign = m.user_id != scope.user_id
        fallback = _imported_id(scope.user_id, replacement) if foreign else replacement
        replacement = final.get(replacement, fallback)
    return {
        "id": memory_id,
        "user_id": scope.user_id,
        "agent_id": scope.agent_id or m.agent_id,
        "session_id": m.session_id,
        "text": m.text,
        "vector": vector,
        "hash": normalized_hash(m.text),
        "metadata": msgspec.json.encode(m.metadata).decode(),
        "created_at": _utc(m.created_at),
        "updated_at": _utc(m.updated_at),
        "source": m.source,
        "superseded_by": replacement,
        "superseded_at": _utc(m.superseded_at) if m.superseded_at else None,
    }


class _ApplyRequest:
    """One job's decisions waiting for the group writer."""

    def __init__(
        self,
        scope: Scope,
        ops: Sequence[Operation],
        source: str,
        actor: Actor,
        at: datetime,
        fresh: bool,
        vectors: dict[str, np.ndarray],
        metadata: str = "{}",
    ) -> None:
        self.scope = scope
        self.metadata = metadata  # JSON, for the rows its ADDs insert
        self.ops = ops
        self.source = source
        self.actor = actor
        self.at = at
        self.fresh = fresh
        self.vectors = vectors
        self.future: asyncio.Future[list[HistoryEntry]] = asyncio.get_running_loop().create_future()


class _Nearest:
    """A search's cosine top list, valid while its scope's cache token holds,
    and the query's embedding (valid for good)."""

    __slots__ = ("complete", "rows", "token", "vector")

    def __init__(
        self,
        token: tuple[int, int],
        rows: list[Mapping[str, Any]],
        complete: bool,
        vector: np.ndarray,
    ) -> None:
        self.token = token
        self.rows = rows  # best first
        self.complete = complete  # every active row of the scope is in `rows`
        self.vector = vector


class _Plan:
    """What one job's operations change, given what is stored (no I/O)."""

    def __init__(self, request: _ApplyRequest) -> None:
        self.request = request
        ops = request.ops
        self.new_ids = {i: _op_id(request.source, i, "") for i in range(len(ops))}
        self.entry_ids = {i: _op_id(request.source, i, "history") for i in range(len(ops))}
        self.texts = _op_texts(ops)
        targets = [op.memory_id for op in ops if op.op in ("UPDATE", "DELETE") and op.memory_id]
        # A fresh job cannot have written its own rows yet: only targets are read.
        own = [] if request.fresh else list(self.new_ids.values())
        self.lookup_ids = list(dict.fromkeys([*targets, *own]))
        self.hashes = list(dict.fromkeys(normalized_hash(t) for t in self.texts.values()))
        self.inserts: dict[str, dict[str, Any]] = {}
        self.supersede: dict[str, dict[str, Any]] = {}
        self.deletes: list[str] = []
        self.entries: list[dict[str, Any]] = []

    def decide(
        self,
        existing: dict[str, dict[str, Any]],
        active_hashes: dict[str, str],
        recorded: set[str],
    ) -> None:
        request = self.request
        scope, at, source, actor = request.scope, request.at, request.source, request.actor
        new_ids, entry_ids, texts = self.new_ids, self.entry_ids, self.texts
        inserts, supersede = self.inserts, self.supersede
        touched: set[str] = set()

        def entry(
            i: int,
            memory_id: str,
            event: str,
            old: str | None,
            new: str | None,
            agent_id: str | None,
        ) -> None:
            self.entries.append(
                {
                    "id": entry_ids[i],
                    "memory_id": memory_id,
                    "user_id": scope.user_id,
                    "agent_id": agent_id,
                    "event": event,
                    "old_text": old,
                    "new_text": new,
                    "at": at,
                    "source": source,
                    "actor": actor,
                }
            )

        def new_row(
            i: int, text: str, agent_id: str | None, session_id: str | None, metadata: str
        ) -> dict[str, Any]:
            return {
                "id": new_ids[i],
                "user_id": scope.user_id,
                "agent_id": agent_id,
                "session_id": session_id,
                "text": text,
                "vector": None,
                "hash": normalized_hash(text),
                "metadata": metadata,
                "created_at": at,
                "updated_at": at,
                "source": source,
                "superseded_by": None,
                "superseded_at": None,
            }

        for i, op in enumerate(request.ops):
            nid = new_ids[i]
            if op.op == "ADD":
                if i not in texts or entry_ids[i] in recorded:
                    continue
                text = texts[i]
                if nid in existing:  # inserted before an interruption
                    entry(i, nid, "ADD", None, text, existing[nid]["agent_id"])
                    continue
                digest = normalized_hash(text)
                if digest in active_hashes:
                    continue
                inserts[nid] = new_row(i, text, scope.agent_id, scope.session_id, request.metadata)
                active_hashes[digest] = nid
                entry(i, nid, "ADD", None, text, scope.agent_id)
            elif op.op == "UPDATE":
                target = existing.get(op.memory_id or "")
                if (
                    i not in texts
                    or entry_ids[i] in recorded
                    or target is None
                    or target["id"] in touched
                ):
                    continue
                text = texts[i]
                if target["superseded_by"] not in (None, nid):
                    continue
                digest = normalized_hash(text)
                if digest == target["hash"]:
                    continue
                touched.add(target["id"])
                replacement = active_hashes.get(digest)
                if replacement is None or replacement == target["id"]:
                    replacement = nid
                    if nid not in existing:
                        inserts[nid] = new_row(
                            i,
                            text,
                            target["agent_id"],
                            scope.session_id or target["session_id"],
                            target["metadata"],
                        )
                    active_hashes[digest] = nid
                if target["superseded_by"] is None:
                    supersede[target["id"]] = {
                        **target,
                        "superseded_by": replacement,
                        "superseded_at": at,
                    }
                entry(i, replacement, "UPDATE", target["text"], text, target["agent_id"])
            elif op.op == "DELETE":
                target = existing.get(op.memory_id or "")
                if target is None or target["id"] in touched:
                    continue
                touched.add(target["id"])
                self.deletes.append(target["id"])
                if entry_ids[i] not in recorded:
                    entry(i, target["id"], "DELETE", target["text"], None, target["agent_id"])


async def _connect(path: Path, config: MemoryConfig) -> Any:
    session = lancedb.Session(
        index_cache_size_bytes=config.maintenance.index_cache_bytes,
        metadata_cache_size_bytes=config.maintenance.metadata_cache_bytes,
    )
    consistency = timedelta(seconds=config.maintenance.read_consistency_seconds)
    return await lancedb.connect_async(
        str(path), session=session, read_consistency_interval=consistency
    )


class MemoryStore:
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
        changes: ChangeLog,
    ) -> None:
        self._path = path
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
        self._loading: dict[Key, asyncio.Future[ScopeIndex]] = {}
        # What recent searches found nearest by cosine, by (scope, query): the
        # extraction of a chat exchange asks `related` for the same text the
        # request searched with, moments later (see `related`).
        self._recent: OrderedDict[tuple[Key, str], _Nearest] = OrderedDict()
        # Embeddings handed over by a serving process for `related` (see `expect_vector`).
        self._handed = QueryCache(_RECENT_SEARCHES, max_chars=_HANDED_MAX_CHARS)
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
        self._applies: list[_ApplyRequest] = []
        self._applier: asyncio.Future[None] | None = None

    @classmethod
    async def open(cls, path: Path, embedder: Embedder, config: MemoryConfig) -> MemoryStore:
        """Create or open the tables under `path`; warm the embedder.

        Raises `EmbedderMismatch` when the tables were built with another
        embedder name or dimension.
        """
        warm: Callable[[], Awaitable[None]] | None = getattr(embedder, "warm", None)
        if warm is not None:
            await warm()
        if not embedder.dimensions:
            raise EmbedderError(f"embedder {embedder.name!r} does not know its dimension")
        await asyncio.to_thread(Path(path).mkdir, parents=True, exist_ok=True)
        db = await _connect(path, config)
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
        changes = await asyncio.to_thread(ChangeLog, Path(path) / CHANGES_FILE)
        store = cls(db, memories, history, embedder, config, path=Path(path), changes=changes)
        await store._ensure_indices()
        return store

    async def _ensure_indices(self) -> None:
        have = {tuple(i.columns): i.index_type for i in await self._memories.list_indices()}
        if ("text",) not in have:
            await self._memories.create_index("text", config=_FTS_CONFIG)
        for column in ("user_id", "id"):
            if (column,) not in have:
                await self._memories.create_index(column, config=BTree())
        if ("vector",) not in have:
            rows = await self._memories.count_rows()
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
        db = await _connect(self._path, self._config)
        memories = await db.open_table(MEMORIES)
        history = await db.open_table(HISTORY)
        self._db, self._memories, self._history = db, memories, history

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
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
            await self._memories.count_rows(build_filter(ids=[]))
        except Exception:
            log.exception("memory store is not ready")
            return False
        return True

    # ---------- writes: one at a time, retried on commit conflicts ----------

    async def _retry(self, fn: Callable[[], Awaitable[T]]) -> T:
        for attempt in range(_WRITE_ATTEMPTS):
            try:
                return await fn()
            except Exception as exc:
                if attempt == _WRITE_ATTEMPTS - 1 or not _is_conflict(exc):
                    raise
                log.warning("LanceDB commit conflict, retrying (%s)", exc)
                await asyncio.sleep(0.02 * 2**attempt)
        raise AssertionError("unreachable")

    def _wrote(self, n: int = 1) -> None:
        self._writes += n
        self._writes_changed.set()

    @property
    def writes_since_optimize(self) -> int:
        return self._writes

    def forget_writes(self) -> None:
        """Another process optimizes: our writes are counted there, by version."""
        self._writes = 0

    async def needs_optimize(self) -> bool:
        """Writes since the last optimize, ours or (by table version) another process's."""
        version = await self._memories.version()
        if self._optimized_version is None:
            self._optimized_version = version
        return self._writes > 0 or version != self._optimized_version

    async def wait_for_writes(self, n: int) -> None:
        """Return once at least `n` writes happened since the last optimize."""
        while self._writes < n:
            self._writes_changed.clear()
            await self._writes_changed.wait()

    async def _commit(
        self, fn: Callable[[], Awaitable[Any]], mirror: Callable[[], None], changes: Changes
    ) -> None:
        """Run one memories-table write, log which rows its version changed (for
        the other processes' caches), then apply it to our cache with `mirror`.

        Versions that appeared meanwhile and are not ours were another
        process's: the rows they changed are re-read into the cache (all of
        it is dropped when the change log cannot say).
        """
        self._own_writes += 1
        try:
            known = self._version
            async with locked(self._writes_lock, shared=True):
                try:
                    result = await self._retry(fn)
                except BaseException:
                    # Written or not, we cannot tell: the cache must not guess.
                    if self._cache is not None:
                        self._cache.clear()
                    self._version = None
                    raise
                mine = getattr(result, "version", None)
                if mine is not None:
                    try:
                        await asyncio.to_thread(self._changes.record, mine, changes)
                    except Exception as exc:
                        # The write stands; other processes see an unlogged
                        # version and drop their whole cache, which is safe.
                        log.warning("could not log table version %s: %s", mine, exc)
            if self._cache is None:
                return
            after = await self._memories.version()
            mirror()
            if known is None or mine is None:
                self._cache.clear()
                self._version = after
            else:
                pending = await self._follow(set(range(known + 1, after + 1)) - {mine})
                self._version = after if pending is None else pending - 1
        finally:
            self._own_writes -= 1

    async def _follow(self, versions: set[int]) -> int | None:
        """Bring the cache up to what other processes changed in `versions`.

        Returns None when every version is followed, or the first version
        nobody has logged yet: the caller must not count the cache as past it.
        One still unlogged after `_UNLOGGED_GRACE` seconds (a writer that died
        between commit and log, or a log that could not be written) drops the
        cache.
        """
        assert self._cache is not None
        if not versions:
            return None
        try:
            logged = await asyncio.to_thread(self._changes.logged, min(versions), max(versions))
        except Exception as exc:
            log.warning("change log unreadable (%s); search cache dropped", exc)
            self._cache.clear()
            return None
        await self._refresh({v: c for v, c in logged.items() if v in versions})
        missing = sorted(v for v in versions if v not in logged)
        if not missing:
            self._unlogged_since = None
            return None
        now = time.monotonic()
        if self._unlogged_since is None:
            self._unlogged_since = now
        if now - self._unlogged_since < _UNLOGGED_GRACE:
            return missing[0]
        log.info(
            "memories table moved by unlogged version(s) %s; search cache dropped", missing[:5]
        )
        self._cache.clear()
        self._unlogged_since = None
        return None

    async def _insert(self, rows: list[dict[str, Any]]) -> None:
        if rows:
            data = pa.Table.from_pylist(rows, schema=self._schema)
            await self._commit(
                lambda: self._memories.add(data), lambda: self._mirror(rows), _changed(rows)
            )
            self._wrote()

    async def _upsert(self, rows: list[dict[str, Any]]) -> None:
        """Replace whole rows by id (rows already read under a scope filter)."""
        if rows:
            data = pa.Table.from_pylist(rows, schema=self._schema)
            await self._commit(
                lambda: self._memories.merge_insert("id").when_matched_update_all().execute(data),
                lambda: self._mirror(rows),
                _changed(rows),
            )
            self._wrote()

    def _mirror(self, rows: list[dict[str, Any]]) -> None:
        if self._cache is not None:
            self._cache.apply(rows)

    async def _record(self, entries: list[dict[str, Any]]) -> None:
        if entries:
            data = pa.Table.from_pylist(entries, schema=self._history_schema)
            await self._retry(lambda: self._history.add(data))
            self._wrote()

    async def _remove(self, scope: Scope, ids: Sequence[str] | None = None) -> None:
        """Delete `ids` of the scope, or all of its rows when `ids` is None."""
        where = scope_filter(scope, ids=ids)
        cache = self._cache

        def mirror() -> None:
            if cache is None:
                return
            if ids is None:
                cache.drop_user(scope.user_id)
            else:
                cache.remove(scope.user_id, ids)

        changes = {scope.user_id: None if ids is None else set(ids)}
        await self._commit(lambda: self._memories.delete(where), mirror, changes)
        self._wrote()

    # ---------- reads ----------

    async def _rows(
        self, where: str, *, vectors: bool = False, limit: int | None = None
    ) -> list[dict[str, Any]]:
        columns = [*_MEMORY_COLUMNS, "vector", "hash"] if vectors else [*_MEMORY_COLUMNS, "hash"]
        query = self._memories.query().where(where).select(columns)
        if limit is not None:
            query = query.limit(limit)
        return await query.to_list()

    async def _rows_by_ids(
        self, scope: Scope, ids: Sequence[str], *, vectors: bool = False
    ) -> dict[str, dict[str, Any]]:
        found: dict[str, dict[str, Any]] = {}
        unique = list(dict.fromkeys(ids))
        for i in range(0, len(unique), _IN_CHUNK):
            chunk = unique[i : i + _IN_CHUNK]
            for row in await self._rows(scope_filter(scope, ids=chunk), vectors=vectors):
                found[row["id"]] = row
        return found

    async def _history_ids(self, ids: Sequence[str]) -> set[str]:
        if not ids:
            return set()
        rows = (
            await self._history.query().where(build_filter(ids=list(ids))).select(["id"]).to_list()
        )
        return {r["id"] for r in rows}

    async def _embed(self, texts: Sequence[str]) -> np.ndarray:
        vectors = await self._embedder.embed(texts)
        if vectors.shape != (len(texts), self._embedder.dimensions):
            raise EmbedderError(
                f"embedder returned shape {vectors.shape}, "
                f"expected ({len(texts)}, {self._embedder.dimensions})"
            )
        return vectors

    # ---------- search ----------

    async def search(
        self,
        scope: Scope,
        query: str,
        *,
        limit: int | None = None,
        min_score: float | None = None,
        include_superseded: bool = False,
    ) -> list[Hit]:
        """The memories of `scope` most relevant to `query`, best first.

        Cosine similarity and full-text (BM25 over 1-3 character n-grams)
        candidates are fused (`SearchConfig.fusion`); a hit must still reach
        `min_score` cosine similarity. Active memories come from the scope
        cache when enabled, else from LanceDB (which also scans fresh rows
        not yet in its full-text index).
        """
        search = self._config.search
        limit = search.limit if limit is None else limit
        min_score = search.min_score if min_score is None else min_score
        if limit <= 0:
            return []
        candidates = max(limit * 3, 20)
        fts_text = query.strip()[:_FTS_QUERY_CHARS] if search.hybrid else ""
        if self._cache is not None and not include_superseded:
            token = self._cache.token(scope.user_id)
            found, entry, vector = await self._cached_candidates(scope, query, fts_text, candidates)
            complete = len(found.by_vector) == len(entry)
            self._remember(scope, query, token, found, vector, complete=complete)
        else:
            vector = (await self._embed([query]))[0]
            where = scope_filter(scope, active_only=not include_superseded)
            found = await self._lance_candidates(vector, fts_text, where, candidates)
        return self._fuse(found, limit=limit, min_score=min_score)

    def _fuse(self, found: Candidates, *, limit: int, min_score: float) -> list[Hit]:
        search = self._config.search
        similarity: dict[str, float] = {}
        rows: dict[str, Mapping[str, Any]] = {}
        for row, sim in found.by_vector:
            similarity[row["id"]] = sim
            rows[row["id"]] = row
        for row, sim, _ in found.by_text:
            if row["id"] not in similarity:
                similarity[row["id"]] = sim
                rows[row["id"]] = row
        if not found.by_text:
            fused = dict(similarity)
        elif search.fusion == "rrf":
            fused = reciprocal_rank_fusion(
                [[r["id"] for r, _ in found.by_vector], [r["id"] for r, _, _ in found.by_text]]
            )
        else:
            bm25 = {r["id"]: score for r, _, score in found.by_text}
            fused = boosted_similarity(similarity, bm25, weight=search.text_weight)
        ranked = sorted(
            (i for i in fused if similarity[i] >= min_score), key=lambda i: (-fused[i], i)
        )
        ranked = ranked[:limit]
        return [
            Hit(memory=_to_memory(rows[i]), score=fused[i], similarity=similarity[i])
            for i in ranked
        ]

    async def _cached_candidates(
        self, scope: Scope, query: str, text: str, k: int
    ) -> tuple[Candidates, ScopeIndex, np.ndarray]:
        """Both top lists from the scope cache. For a large scope, BM25 and the
        vector product run on two threads at once (the text side needs no
        embedding, so it also overlaps embedding a new query): on an idle core
        that is ~1 ms less per request, and under load no more CPU."""
        loading = asyncio.ensure_future(self._scope_index(scope))

        async def by_vector() -> tuple[ScopeIndex, np.ndarray, Any]:
            vector = (await self._embed([query]))[0]
            entry = await loading
            if len(entry) < _INLINE_ROWS:
                return entry, vector, None
            return entry, vector, await self._score(self._scorer, entry.vector_top, vector, k)

        async def by_text() -> Any:
            entry = await loading
            if not text or len(entry) < _INLINE_ROWS:
                return None
            return await self._score(self._text_scorer, entry.text_top, text, k)

        (entry, vector, vector_top), text_top = await asyncio.gather(by_vector(), by_text())
        if vector_top is None:  # small scope: a thread hop costs more than scoring it
            return entry.candidates(vector, text, k), entry, vector
        return entry.assemble(*vector_top, text_top), entry, vector

    async def _lance_candidates(
        self, vector: np.ndarray, text: str, where: str, limit: int
    ) -> Candidates:
        vector_query = (
            self._memories.query()
            .nearest_to(vector)
            .distance_type("cosine")
            .where(where)
            .select([*_MEMORY_COLUMNS, "_distance"])
            .limit(limit)
        )
        if text:
            by_vector, by_text = await asyncio.gather(
                vector_query.to_list(), self._text_candidates(text, where, limit)
            )
        else:
            by_vector, by_text = await vector_query.to_list(), []
        return Candidates(
            [(r, 1.0 - float(r["_distance"])) for r in by_vector],
            [
                (r, float(np.asarray(r["vector"], dtype=np.float32) @ vector), float(r["_score"]))
                for r in by_text
            ],
        )

    async def _text_candidates(self, text: str, where: str, limit: int) -> list[dict[str, Any]]:
        try:
            return (
                await self._memories.query()
                .nearest_to_text(text, columns="text")
                .where(where)
                .select([*_MEMORY_COLUMNS, "vector", "_score"])
                .limit(limit)
                .to_list()
            )
        except Exception:
            # Full text is a booster: a failing FTS query must not fail retrieval.
            log.exception("full-text search failed; using vector results only")
            return []

    def _remember(
        self,
        scope: Scope,
        query: str,
        token: tuple[int, int],
        found: Candidates,
        vector: np.ndarray,
        *,
        complete: bool,
    ) -> None:
        if self._cache is None or token != self._cache.token(scope.user_id):
            return  # the scope changed during the search: nothing to vouch for
        key = _recent_key(scope, query)
        rows = [row for row, _ in found.by_vector]
        self._recent[key] = _Nearest(token, rows, complete, vector)
        self._recent.move_to_end(key)
        while len(self._recent) > _RECENT_SEARCHES:
            self._recent.popitem(last=False)

    async def _recently_found(
        self, scope: Scope, text: str, k: int
    ) -> list[Mapping[str, Any]] | None:
        """The rows of `related(scope, text, k)` from a recent search with the
        same text, when the scope has not changed since (same cache token) and
        it kept at least `k` rows (or all of them)."""
        assert self._cache is not None
        recent = self._recent.get(_recent_key(scope, text))
        if recent is None:
            return None
        await self._check_version(shared=True)  # follows other processes' writes: bumps the token
        if recent.token != self._cache.token(scope.user_id):
            return None
        if len(recent.rows) < k and not recent.complete:
            return None
        return recent.rows[:k]

    async def related(self, scope: Scope, text: str, k: int) -> list[Memory]:
        """The `k` active memories closest to `text` (the extractor's context).

        The request that produced an exchange searched with its user's turn a
        moment before its extraction asks for this: the search's cosine top
        list answers it, with no embedding and no scan, while the scope is
        unchanged.
        """
        if k <= 0:
            return []
        handed = self._handed.get(text)
        if self._cache is not None:
            rows = await self._recently_found(scope, text, k)
            if rows is None:
                embedded, entry = await asyncio.gather(
                    self._embed_unless(handed, text), self._scope_index(scope)
                )
                if len(entry) < _INLINE_ROWS:
                    found = entry.nearest(embedded, k)
                else:
                    # Background work: not on the scoring thread, where requests' searches queue.
                    found = await asyncio.to_thread(entry.nearest, embedded, k)
                rows = [row for row, _ in found]
            return [_to_memory(row) for row in rows]
        vector = await self._embed_unless(handed, text)
        rows = (
            await self._memories.query()
            .nearest_to(vector)
            .distance_type("cosine")
            .where(scope_filter(scope, active_only=True))
            .select([*_MEMORY_COLUMNS, "_distance"])
            .limit(k)
            .to_list()
        )
        return [_to_memory(r) for r in rows]

    def searched_vector(self, scope: Scope, text: str) -> np.ndarray | None:
        """The embedding of `text`, if a search of `scope` used it lately: the
        serving process hands it with the exchange to the extraction process,
        whose `related` then needs no embedding (`expect_vector` there)."""
        recent = self._recent.get(_recent_key(scope, text))
        return None if recent is None else recent.vector

    def expect_vector(self, text: str, vector: np.ndarray) -> None:
        """`related(..., text, ...)` is coming, and this is the text's embedding
        (it depends on the text alone, so it is valid for any scope)."""
        if vector.shape != (self._embedder.dimensions,):
            return  # another embedder's: not usable here
        self._handed.put(text, vector)

    async def _embed_unless(self, vector: np.ndarray | None, text: str) -> np.ndarray:
        return vector if vector is not None else (await self._embed([text]))[0]

    # ---------- the scope cache ----------

    async def _score(self, scorer: ThreadPoolExecutor, fn: Callable[..., T], *args: Any) -> T:
        """Score a request's search (numpy, GIL mostly released) on one of the
        store's two scoring threads, vectors or text.

        Concurrent searches queue for them rather than each taking a thread of
        the default pool: on 2 cores, six scans of the same 20 MiB matrix at
        once thrash the caches and each became ~2.5x slower than one alone.
        Background work (the extractor's `related`) stays off them, so requests
        never queue behind it.
        """
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(scorer, functools.partial(fn, *args))

    async def _scope_index(self, scope: Scope) -> ScopeIndex:
        """The scope's cached active memories, loaded on first use (one load
        per scope at a time; concurrent searches wait for the same one)."""
        assert self._cache is not None
        await self._check_version(shared=True)
        key: Key = (scope.user_id, scope.agent_id)
        entry = self._cache.get(key)
        if entry is not None:
            return entry
        loading = self._loading.get(key)
        if loading is None:
            loading = asyncio.ensure_future(self._load(scope, key))
            self._loading[key] = loading

            def done(future: asyncio.Future[ScopeIndex], key: Key = key) -> None:
                if self._loading.get(key) is future:
                    del self._loading[key]

            loading.add_done_callback(done)
        return await asyncio.shield(loading)

    async def _load(self, scope: Scope, key: Key) -> ScopeIndex:
        assert self._cache is not None
        token = self._cache.token(scope.user_id)
        table = (
            await self._memories.query()
            .where(scope_filter(scope, active_only=True))
            .select([*_MEMORY_COLUMNS, "hash", "vector"])
            .to_arrow()
        )
        # Not on the scoring thread: a cold load must not hold up other searches.
        entry = await asyncio.to_thread(ScopeIndex.from_arrow, table, self._embedder.dimensions)
        del table  # its vectors are copied into the index: freed before the trim
        if len(entry) >= _TRIM_AFTER_ROWS:
            await asyncio.to_thread(release_free_memory)
        self._cache.put(key, entry, token)
        return entry

    async def _check_version(self, *, shared: bool = False) -> bool:
        """Follow the table when it moved without us (another process wrote).

        True when the cache now reflects every version of the table as just
        read; False while a version is still waited for (unlogged) or a write
        of ours is in flight: good enough for a search, not for a check that
        must see every row (the writer's duplicate check).

        `shared`: a search may join a check already in flight rather than
        start its own (16 concurrent searches made 16 LanceDB calls for one
        answer); it then sees other processes' writes as of that check's
        start, a moment earlier. Checks that must see every version so far
        (the duplicate check, maintenance) read afresh.
        """
        assert self._cache is not None
        if self._own_writes:
            return False
        if not shared:
            return await self._read_version()
        checking = self._checking
        if checking is None or checking.done():
            checking = self._checking = asyncio.ensure_future(self._read_version())
            checking.add_done_callback(_retrieve)
        return await asyncio.shield(checking)

    async def _read_version(self) -> bool:
        assert self._cache is not None
        known = self._version
        version = await self._memories.version()
        if self._own_writes:
            return False
        if version == known:
            return True
        pending = None
        if known is None or version < known:
            self._cache.clear()
        else:
            pending = await self._follow(set(range(known + 1, version + 1)))
        # A write of ours that started meanwhile sets the version itself.
        if self._version == known and not self._own_writes:
            self._version = version if pending is None else pending - 1
            return pending is None
        return False

    async def _refresh(self, logged: Mapping[int, Mapping[str, frozenset[str] | None]]) -> None:
        """Re-read into the cache the rows other processes' versions changed.

        Only users with a cached scope are read; a user logged as a whole
        (None), or whose rows cannot be read, is dropped and reloads on its
        next search. Rows are read as they are now, which may be newer than
        the versions followed: those are followed later, to the same rows.
        """
        cache = self._cache
        assert cache is not None
        for user_id, ids in merged(logged).items():
            if ids is None or not cache.holds(user_id):
                # Also invalidates a load of this user in flight.
                cache.drop_user(user_id)
                continue
            token = cache.token(user_id)
            try:
                found = await self._rows_by_ids(Scope(user_id=user_id), sorted(ids), vectors=True)
            except Exception as exc:
                log.warning("could not re-read changed memories (%s); user reloads", exc)
                cache.drop_user(user_id)
                continue
            if cache.token(user_id) != token:
                cache.drop_user(user_id)  # we wrote meanwhile: no guessing which is newer
                continue
            cache.apply(found.values())
            gone = [i for i in ids if i not in found]
            if gone:
                cache.remove(user_id, gone)

    # ---------- extraction decisions ----------

    async def apply(
        self,
        scope: Scope,
        ops: Sequence[Operation],
        *,
        source: str,
        actor: Actor,
        at: datetime,
        fresh: bool = False,
        metadata: dict[str, Any] | None = None,
    ) -> list[HistoryEntry]:
        """Apply one extraction job's decisions; replaying the same job is a no-op.

        The i-th operation's new row and history entry have ids derived from
        (source, i), and each step checks what is already there, so a job
        interrupted anywhere and replayed ends in the same state. Ids outside
        `scope` are ignored. `fresh` promises that nothing of `source` was ever
        written (its decision was made in this attempt), which skips the
        replay checks.

        Concurrent calls are grouped: one write of rows and one of history for
        the whole group (LanceDB makes a version and a fragment per write).
        """
        texts = list(dict.fromkeys(_op_texts(ops).values()))
        # Embedded before queueing, outside the lock: the embedder batches
        # concurrent jobs, and the writer never waits on it.
        vectors = dict(zip(texts, await self._embed(texts), strict=True)) if texts else {}
        request = _ApplyRequest(
            scope,
            ops,
            source,
            actor,
            _utc(at),
            fresh,
            vectors,
            msgspec.json.encode(metadata or {}).decode(),
        )
        self._applies.append(request)
        if self._applier is None or self._applier.done():
            self._applier = asyncio.ensure_future(self._drain_applies())
        return await asyncio.shield(request.future)

    async def _drain_applies(self) -> None:
        async with self._lock:
            while self._applies:
                group, rest, users = [], [], set()
                for request in self._applies:
                    # One job per user and group: a user's jobs stay in order.
                    if request.scope.user_id in users or request.future.done():
                        rest.append(request)
                    else:
                        users.add(request.scope.user_id)
                        group.append(request)
                self._applies = [r for r in rest if not r.future.done()]
                for start in range(0, len(group), _APPLY_GROUP):
                    chunk = group[start : start + _APPLY_GROUP]
                    await self._apply_chunk(chunk)

    async def _apply_chunk(self, chunk: list[_ApplyRequest]) -> None:
        try:
            results = await self._apply_group(chunk)
        except Exception as exc:
            if len(chunk) == 1:
                if not chunk[0].future.done():
                    chunk[0].future.set_exception(exc)
                return
            # One bad job must not fail its neighbours: each again, alone. Part
            # of the group may be written, so no job counts as fresh any more.
            for request in chunk:
                request.fresh = False
                await self._apply_chunk([request])
            return
        for request, entries in zip(chunk, results, strict=True):
            if not request.future.done():
                request.future.set_result(entries)

    async def _apply_group(self, group: list[_ApplyRequest]) -> list[list[HistoryEntry]]:
        plans = [_Plan(r) for r in group]
        # What is already stored, read once for the whole group.
        id_filters = [
            scope_filter(p.request.scope, ids=p.lookup_ids) for p in plans if p.lookup_ids
        ]
        # Active rows with the new texts' hashes: from the search cache when
        # the scope is cached (brought up to other processes' writes first),
        # else from LanceDB.
        cached = await self._cached_hashes(plans)
        hash_filters = [
            scope_filter(p.request.scope, hashes=p.hashes, active_only=True)
            for p in plans
            if p.hashes and id(p) not in cached
        ]
        entry_ids = [e for p in plans if not p.request.fresh for e in p.entry_ids.values()]
        by_id = await self._rows_any(id_filters, vectors=True)
        by_hash = await self._rows_any(hash_filters)
        recorded = await self._history_ids(entry_ids)
        inserts: dict[str, dict[str, Any]] = {}
        supersede: dict[str, dict[str, Any]] = {}
        entries: list[list[dict[str, Any]]] = []
        deletes: list[tuple[Scope, list[str]]] = []
        missing: list[tuple[dict[str, Any], str]] = []
        for plan in plans:
            scope = plan.request.scope
            existing = {r["id"]: r for r in by_id if _in_scope(r, scope)}
            wanted = set(plan.hashes)
            active = cached.get(id(plan))
            if active is None:
                active = {
                    r["hash"]: r["id"]
                    for r in by_hash
                    if r["hash"] in wanted and _in_scope(r, scope)
                }
            plan.decide(existing, active, recorded)
            for row in plan.inserts.values():
                vector = plan.request.vectors.get(row["text"])
                if vector is None:
                    missing.append((row, row["text"]))
                row["vector"] = vector
            inserts.update(plan.inserts)
            supersede.update(plan.supersede)
            entries.append(plan.entries)
            if plan.deletes:
                deletes.append((scope, plan.deletes))
        if missing:
            for (row, _), vec in zip(
                missing, await self._embed([t for _, t in missing]), strict=True
            ):
                row["vector"] = vec
        # Order matters for replay: rows, then supersession, then history, then deletes.
        await self._insert(list(inserts.values()))
        await self._upsert(list(supersede.values()))
        await self._record([e for job in entries for e in job])
        for scope, ids in deletes:
            await self._remove(scope, ids)
        return [[_to_entry(e) for e in job] for job in entries]

    async def _cached_hashes(self, plans: Sequence[_Plan]) -> dict[int, dict[str, str]]:
        """For each plan (by `id`) whose scope is cached: hash -> id of the
        scope's active rows with its texts' hashes."""
        if self._cache is None or not any(p.hashes for p in plans):
            return {}
        if not await self._check_version():
            return {}  # not sure the cache has every row: ask LanceDB
        out: dict[int, dict[str, str]] = {}
        for plan in plans:
            scope = plan.request.scope
            entry = self._cache.peek((scope.user_id, scope.agent_id))
            if plan.hashes and entry is not None:
                found = entry.with_hashes(plan.hashes)
                if found is not None:
                    out[id(plan)] = found
        return out

    async def _rows_any(
        self, filters: Sequence[str], *, vectors: bool = False
    ) -> list[dict[str, Any]]:
        """Rows matching any of `filters` (each one from `scope_filter`)."""
        rows: list[dict[str, Any]] = []
        for i in range(0, len(filters), _OR_CHUNK):
            chunk = filters[i : i + _OR_CHUNK]
            rows += await self._rows(" OR ".join(f"({f})" for f in chunk), vectors=vectors)
        return rows

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
        at = _utc(at) if at else _now()
        digest = normalized_hash(text)
        vector = (await self._embed([text]))[0]
        async with self._lock:
            dupes = await self._rows(
                scope_filter(scope, hashes=[digest], active_only=True), limit=1
            )
            if dupes:
                return _to_memory(dupes[0])
            row = {
                "id": str(uuid.uuid4()),
                "user_id": scope.user_id,
                "agent_id": scope.agent_id,
                "session_id": scope.session_id,
                "text": text,
                "vector": vector,
                "hash": digest,
                "metadata": msgspec.json.encode(metadata or {}).decode(),
                "created_at": at,
                "updated_at": at,
                "source": source,
                "superseded_by": None,
                "superseded_at": None,
            }
            await self._insert([row])
            await self._record([self._entry(row, "ADD", None, text, at, source, actor)])
        return _to_memory(row)

    def _entry(
        self,
        row: dict[str, Any],
        event: str,
        old: str | None,
        new: str | None,
        at: datetime,
        source: str | None,
        actor: Actor,
    ) -> dict[str, Any]:
        return {
            "id": str(uuid.uuid4()),
            "memory_id": row["id"],
            "user_id": row["user_id"],
            "agent_id": row["agent_id"],
            "event": event,
            "old_text": old,
            "new_text": new,
            "at": at,
            "source": source,
            "actor": actor,
        }

    async def get(self, scope: Scope, memory_id: str) -> Memory | None:
        rows = await self._rows(scope_filter(scope, ids=[memory_id]), limit=1)
        return _to_memory(rows[0]) if rows else None

    async def list(
        self, scope: Scope, *, limit: int = 100, offset: int = 0, include_superseded: bool = False
    ) -> list[Memory]:
        """Oldest first, stable across pages."""
        rows = (
            await self._memories.query()
            .where(scope_filter(scope, active_only=not include_superseded))
            .select(_MEMORY_COLUMNS)
            .order_by(_ORDER)
            .offset(max(0, offset))
            .limit(max(0, limit))
            .to_list()
        )
        return [_to_memory(r) for r in rows]

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
            at = _now()
            row = {**old, "updated_at": at}
            if text is not None:
                row.update(text=text, vector=vector, hash=normalized_hash(text))
            if metadata is not None:
                row["metadata"] = msgspec.json.encode(metadata).decode()
            await self._upsert([row])
            await self._record(
                [self._entry(row, "UPDATE", old["text"], row["text"], at, None, actor)]
            )
        return _to_memory(row)

    async def delete(self, scope: Scope, memory_id: str, *, actor: Actor = "api") -> bool:
        async with self._lock:
            rows = await self._rows(scope_filter(scope, ids=[memory_id]), limit=1)
            if not rows:
                return False
            await self._record(
                [self._entry(rows[0], "DELETE", rows[0]["text"], None, _now(), None, actor)]
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
        return [_to_entry(r) for r in rows]

    async def export(self, scope: Scope) -> builtins.list[Memory]:
        """Every memory of the scope, superseded ones included, oldest first."""
        rows = (
            await self._memories.query()
            .where(scope_filter(scope))
            .select(_MEMORY_COLUMNS)
            .order_by(_ORDER)
            .to_list()
        )
        return [_to_memory(r) for r in rows]

    async def import_memories(self, scope: Scope, memories: Iterable[Memory]) -> ImportResult:
        """Insert memories under `scope`'s user, keeping texts, metadata and
        timestamps; the result accounts for every memory given.

        A memory of the same user keeps its id, and one already present is
        skipped: importing an export twice is harmless. A memory of another
        user, or one whose id another user's row holds, gets an id derived
        from the target user and its own (`_imported_id`), so that import is
        idempotent too. No other user's row is ever overwritten.

        `superseded_by` follows a replacement in the import to its new id;
        a foreign one outside the import takes the id that replacement would
        get here. It is never dropped: a row replaced by nothing is active,
        and an outdated fact would come back into chats.
        """
        result = ImportResult()
        accepted = _screen(memories, result)
        owners = await self._owners(
            [c for _, m in accepted for c in _id_candidates(scope.user_id, m)]
        )
        planned: builtins.list[tuple[int, Memory, str]] = []
        final: dict[str, str] = {}
        for n, m in accepted:
            memory_id, present = _choose_id(scope.user_id, m, owners)
            final[m.id] = memory_id
            if present:
                result.skipped.append(_issue(n, m, "already_present", "already imported"))
            else:
                planned.append((n, m, memory_id))
        for start in range(0, len(planned), _IN_CHUNK):
            chunk = planned[start : start + _IN_CHUNK]
            result.imported += await self._import_chunk(scope, chunk, final, result)
        result.skipped.sort(key=lambda i: i.line)
        return result

    async def _import_chunk(
        self,
        scope: Scope,
        chunk: builtins.list[tuple[int, Memory, str]],
        final: Mapping[str, str],
        result: ImportResult,
    ) -> int:
        """Insert one chunk of planned rows; an id written meanwhile by
        someone else is skipped, never overwritten."""
        async with self._lock:
            owners = await self._owners([memory_id for _, _, memory_id in chunk])
            fresh = []
            for n, m, memory_id in chunk:
                owner = owners.get(memory_id)
                if owner is None:
                    fresh.append((m, memory_id))
                elif owner == scope.user_id:
                    result.skipped.append(_issue(n, m, "already_present", "already imported"))
                else:
                    result.skipped.append(_issue(n, m, "id_taken", "its id was taken meanwhile"))
            if not fresh:
                return 0
            vectors = await self._embed([m.text for m, _ in fresh])
            rows = [
                _imported_row(scope, m, memory_id, vec, final)
                for (m, memory_id), vec in zip(fresh, vectors, strict=True)
            ]
            await self._insert(rows)
            await self._record(
                [
                    self._entry(r, "ADD", None, r["text"], r["created_at"], r["source"], "import")
                    for r in rows
                ]
            )
        return len(rows)

    async def _owners(self, ids: Sequence[str]) -> dict[str, str]:
        """The user holding each of `ids` that exists, whoever it is (read
        only to keep an import off other users' ids)."""
        owners: dict[str, str] = {}
        unique = builtins.list(dict.fromkeys(ids))
        for i in range(0, len(unique), _IN_CHUNK):
            chunk = unique[i : i + _IN_CHUNK]
            query = self._memories.query().where(build_filter(ids=chunk))
            for row in await query.select(["id", "user_id"]).to_list():
                owners[row["id"]] = row["user_id"]
        return owners

    async def users(self) -> builtins.list[tuple[str, int]]:
        """(user_id, active memory count), most memories first."""
        # Counted batch by batch: only the distinct ids are held, not one per row.
        reader = await (
            self._memories.query()
            .where(build_filter(active_only=True))
            .select(["user_id"])
            .to_batches()
        )
        counts: Counter[str] = Counter()
        async for batch in reader:
            for c in pc.value_counts(batch.column("user_id")).to_pylist():
                counts[c["values"]] += c["counts"]
        return sorted(counts.items(), key=lambda x: (-x[1], x[0]))

    async def count(self, scope: Scope | None = None) -> int:
        """Active memories of `scope`, or of everyone."""
        where = scope_filter(scope, active_only=True) if scope else build_filter(active_only=True)
        return await self._memories.count_rows(where)

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
