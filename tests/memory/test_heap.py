"""The heap helpers hand freed memory back to the OS (glibc; Linux)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from memory.heap import _libc, freeze_startup_objects, release_free_memory

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux") or _libc() is None, reason="glibc only"
)


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def test_freed_heap_memory_goes_back_to_the_os_after_a_release():
    # 64 KiB blocks stay on the heap (below the mmap threshold); a block kept
    # after them pins the top, so only an explicit trim can return the rest.
    blocks = [bytearray(64 * 1024) for _ in range(2000)]
    pin = bytearray(64 * 1024)
    for block in blocks:
        block[::4096] = b"x" * len(block[::4096])  # touch every page
    del blocks
    before = rss_mib()
    release_free_memory()
    after = rss_mib()
    assert before - after > 60, (before, after)
    assert len(pin) == 64 * 1024


def test_objects_alive_after_start_up_are_left_out_of_later_collections():
    import gc

    startup = [[n] for n in range(1000)]  # lists: objects the collector tracks
    try:
        freeze_startup_objects()
        assert gc.get_freeze_count() >= len(startup)
        walked = {id(o) for o in gc.get_objects()}  # what a collection would walk
        assert not any(id(o) in walked for o in startup)
        later = [0]
        assert id(later) in {id(o) for o in gc.get_objects()}
    finally:
        gc.unfreeze()
