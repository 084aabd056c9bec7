"""The commit protocol: how a write reaches the memories table.

Writes run one at a time (the caller holds the store's writer lock) and are
retried on LanceDB commit conflicts. Each memories-table commit holds
`WRITES_LOCK` shared (maintenance takes it exclusively), logs which users'
rows its version changed in the change log beside the tables (for other
processes' caches, `memory.search.coherence`), then applies the same rows
to our own search cache.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import pyarrow as pa

from memory.changelog import Changes
from memory.filters import scope_filter
from memory.locks import FileLock, locked
from memory.models import Scope
from memory.rows import changed
from memory.store.reads import StoreReads

log = logging.getLogger(__name__)

T = TypeVar("T")

_WRITE_ATTEMPTS = 6
# Beside the tables: which users each table version changed (memory/changelog.py).
CHANGES_FILE = "_changes.sqlite3"
# Held shared by every process while it commits to the memories table and logs
# the commit, exclusively by maintenance: the versions in an optimize's span
# are then all its own.
WRITES_LOCK = "_writes.lock"


def _is_conflict(exc: Exception) -> bool:
    text = str(exc).lower()
    return "conflict" in text or "retryable" in text


class Commits(StoreReads):
    """Writes, retried on conflicts, logged, and mirrored into the cache."""

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

    async def _local_writers_quiet(self) -> bool:
        """Whether no process of this machine is between a commit and its log
        record: `WRITES_LOCK` is free (taken exclusively, let go at once). A
        version unlogged then came from another machine (shared store)."""
        lock = FileLock(self._writes_lock)
        try:
            if not await lock.acquire(blocking=False):
                return False
        except OSError:
            return False
        lock.release()
        return True

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

    async def _insert(self, rows: list[dict[str, Any]]) -> None:
        if rows:
            data = pa.Table.from_pylist(rows, schema=self._schema)
            await self._commit(
                lambda: self._memories.add(data), lambda: self._mirror(rows), changed(rows)
            )
            self._wrote()

    async def _upsert(self, rows: list[dict[str, Any]]) -> None:
        """Replace whole rows by id (rows already read under a scope filter)."""
        if rows:
            data = pa.Table.from_pylist(rows, schema=self._schema)
            await self._commit(
                lambda: self._memories.merge_insert("id").when_matched_update_all().execute(data),
                lambda: self._mirror(rows),
                changed(rows),
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
