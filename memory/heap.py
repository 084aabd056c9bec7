"""The process heap (glibc): one allocator, fewer arenas, and freed memory
handed back; and the start-up objects kept out of the garbage collector's way.

Python, numpy, LanceDB's Rust runtime and the embedder allocate through
glibc's malloc, which keeps freed pages and gives every allocating thread its
own arena; pyarrow brings its own allocator (mimalloc) besides. For a
long-running server that is RSS that never comes back (docs/benchmarks.md,
"Memory"). The glibc helpers are no-ops where glibc is absent.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import gc
from functools import cache
from typing import Any

# mallopt's parameter number for the arena limit (malloc.h).
_M_ARENA_MAX = -8


@cache
def _libc() -> Any:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim  # noqa: B018 - glibc only
        libc.mallopt  # noqa: B018
    except (OSError, AttributeError):
        return None
    return libc


def tune_process_heap() -> None:
    """What a gateway process calls first: Arrow on malloc, and few arenas."""
    arrow_on_malloc()
    limit_arenas()


def arrow_on_malloc() -> None:
    """Arrow buffers from glibc's malloc instead of pyarrow's mimalloc pool.

    Loading a 10k-memory scope passes ~90 MiB through Arrow (the query's
    result, then its columns); mimalloc kept ~23 MiB of it for good, out of
    reach of `release_free_memory`.
    """
    import pyarrow as pa

    pa.set_memory_pool(pa.system_memory_pool())


def limit_arenas(arenas: int = 2) -> None:
    """At most `arenas` malloc arenas; call before threads start.

    With LanceDB's runtime, BLAS, the embedder and asyncio's thread pool a
    process would otherwise hold dozens of mostly idle heaps: two measured
    ~50 MiB less RSS under load, with no throughput loss.
    """
    libc = _libc()
    if libc is not None:
        with contextlib.suppress(OSError):
            libc.mallopt(_M_ARENA_MAX, arenas)


def release_free_memory() -> None:
    """Hand freed heap pages back to the OS (`malloc_trim`).

    Loading a 10k-row scope into the search cache allocates ~150 MiB of
    temporary numpy arrays for a 32 MiB result; without a trim the process
    keeps ~100 MiB of them.
    """
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


def freeze_startup_objects() -> None:
    """Exempt everything alive once the process has started from future
    garbage collections (`gc.freeze`).

    A full collection walks every object: with the embedder, LanceDB, the
    SDKs and the framework loaded, ~200k of them, 125-180 ms on the benchmark
    machine, a pause for every request in flight whenever the collector
    decides on one (loading a large user's memories is enough to trigger
    it). Those objects live as long as the process; later collections walk
    only what came after.
    """
    gc.collect()
    gc.freeze()
