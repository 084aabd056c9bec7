"""Cache coherence: keeping the search cache equal to the memories table.

Our own writes update the cache under the writer lock (`memory.store.commit`).
Other processes' writes show as table versions that moved without us: the
change log beside the tables (memory/changelog.py) says which users' rows
each version changed, and those rows are re-read here; a version nobody
logged (for longer than `_UNLOGGED_GRACE`) drops the whole cache.

On a shared store (`storage.uri`, replicas on several machines) each version
check is a LIST on the object store, so it runs at most every `refresh`
seconds, in the background while searches are steady (a cached search then
makes no request at all). With the change log in the queue's database
(memory/changelog_postgres.py) every replica logs its versions there, and
they are followed as a local process's are. With a log of this machine's
only, another machine's versions are never in it: one seen while no local
writer is between commit and log (`_local_writers_quiet`) drops the cache at
once, without the grace.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from typing import Any

from memory.changelog import merged
from memory.filters import scope_filter
from memory.heap import release_free_memory
from memory.models import Scope
from memory.rows import MEMORY_COLUMNS
from memory.scope import ScopeKey
from memory.search.scope_index import ScopeIndex
from memory.search.state import SearchState

log = logging.getLogger(__name__)

# A version another process committed but has not logged is waited for this
# long (seconds) before the whole search cache is dropped instead.
_UNLOGGED_GRACE = 1.0
# Scopes this large leave enough freed heap behind to be worth a malloc_trim.
_TRIM_AFTER_ROWS = 1000


def _retrieve(future: asyncio.Future[Any]) -> None:
    """Mark a shared future's error as seen: every waiter may have been
    cancelled (a search's deadline), which must not log it as lost."""
    if not future.cancelled():
        future.exception()


def _report(future: asyncio.Future[Any]) -> None:
    """A background check's error: nobody awaits it, so it is logged here."""
    if not future.cancelled() and (exc := future.exception()) is not None:
        log.warning("checking the memories table's version failed: %s", str(exc)[:300])


class CacheCoherence(SearchState):
    """Loading scopes into the cache and following the table's versions."""

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
        # Probed before the log is read: a local writer that committed one of
        # `versions` has logged it by the time the probe succeeds.
        foreign = (
            self._refresh is not None
            and not self._changes.shared
            and await self._local_writers_quiet()
        )
        try:
            logged = await asyncio.to_thread(self._changes.logged, min(versions), max(versions))
        except Exception as exc:
            log.warning("change log unreadable (%s); search cache dropped", exc)
            self._cache.clear()
            return None
        await self._refresh_rows({v: c for v, c in logged.items() if v in versions})
        missing = sorted(v for v in versions if v not in logged)
        if not missing:
            self._unlogged_since = None
            return None
        if foreign:
            # Another machine's (or a dead writer's): never logged here.
            log.debug("memories table moved by other replicas; search cache dropped")
            self._cache.clear()
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

    async def _scope_index(self, scope: Scope) -> ScopeIndex:
        """The scope's cached active memories, loaded on first use (one load
        per scope at a time; concurrent searches wait for the same one)."""
        assert self._cache is not None
        await self._check_version(shared=True)
        key = scope.key
        entry = self._cache.get(key)
        if entry is not None:
            return entry
        loading = self._loading.get(key)
        if loading is None:
            loading = asyncio.ensure_future(self._load(scope, key))
            self._loading[key] = loading

            def done(future: asyncio.Future[ScopeIndex], key: ScopeKey = key) -> None:
                if self._loading.get(key) is future:
                    del self._loading[key]

            loading.add_done_callback(done)
        return await asyncio.shield(loading)

    async def _load(self, scope: Scope, key: ScopeKey) -> ScopeIndex:
        assert self._cache is not None
        token = self._cache.token(scope.user_id)
        table = (
            await self._memories.query()
            .where(scope_filter(scope, active_only=True))
            .select([*MEMORY_COLUMNS, "hash", "vector"])
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
        if self._refresh is not None and self._version is not None:
            now = time.monotonic()
            if now < self._fresh_until and self._unlogged_since is None:
                return True  # checked less than `refresh` ago: no request
            if now < self._fresh_until + self._refresh:
                # Due: one check in the background, the search goes on with
                # the cache (at most about two `refresh` behind).
                if checking is None or checking.done():
                    checking = self._checking = asyncio.ensure_future(self._read_version())
                    checking.add_done_callback(_report)
                return False
            # Idle for longer: this search waits, so the bound holds.
        if checking is None or checking.done():
            checking = self._checking = asyncio.ensure_future(self._read_version())
            checking.add_done_callback(_retrieve)
        return await asyncio.shield(checking)

    async def _read_version(self) -> bool:
        assert self._cache is not None
        known = self._version
        if self._refresh is not None:
            # LanceDB's `read_consistency_interval` is `refresh` too: this
            # `version()` is a LIST at most that often.
            self._fresh_until = time.monotonic() + self._refresh
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

    async def _refresh_rows(
        self, logged: Mapping[int, Mapping[str, frozenset[str] | None]]
    ) -> None:
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
