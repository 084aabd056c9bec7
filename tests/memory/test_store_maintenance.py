"""Background maintenance: optimize after bursts of writes, survive failures."""

from __future__ import annotations

import asyncio
import contextlib
import os

from memory.config import MaintenanceConfig
from memory.locks import FileLock
from memory.maintenance import Maintenance
from memory.models import Scope
from memory.store import WRITES_LOCK, MemoryStore
from tests.memory.helpers import HashEmbedder, cached

ALICE = Scope(user_id="alice")


async def wait_until(predicate, timeout=60.0):
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.01)


async def test_a_burst_of_writes_triggers_optimize_without_waiting_for_the_interval(store):
    maintenance = Maintenance(
        store, MaintenanceConfig(interval_seconds=3600, optimize_after_writes=5)
    )
    maintenance.start()
    try:
        for i in range(3):
            await store.add(ALICE, f"fact {i}")
        await wait_until(lambda: maintenance.runs >= 1)
        assert store.writes_since_optimize == 0
        assert await store.count(ALICE) == 3
    finally:
        await maintenance.stop()


async def test_a_failing_optimize_is_logged_and_the_loop_keeps_running(store, monkeypatch, caplog):
    calls = 0
    real = store.optimize

    async def flaky():
        nonlocal calls
        calls += 1
        if calls == 1:
            raise OSError("disk hiccup")
        await real()

    monkeypatch.setattr(store, "optimize", flaky)
    maintenance = Maintenance(
        store, MaintenanceConfig(interval_seconds=0.05, optimize_after_writes=1)
    )
    maintenance.start()
    try:
        await store.add(ALICE, "a fact")
        await wait_until(lambda: maintenance.runs >= 1)
        assert maintenance.failures == 1
        assert "maintenance failed" in caplog.text
    finally:
        await maintenance.stop()


async def test_stop_is_idempotent(store, tmp_path):
    """Every shutdown path may stop maintenance: a second stop returns at once
    and leaves it stopped, its task gone and the lock free for another process."""
    lock = FileLock(tmp_path / "maintenance.lock")
    maintenance = Maintenance(store, MaintenanceConfig(interval_seconds=0.05), lock)
    maintenance.start()
    await wait_until(lambda: lock.held)
    await maintenance.stop()
    async with asyncio.timeout(5):
        await maintenance.stop()
    assert not lock.held
    assert not [t for t in asyncio.all_tasks() if t.get_name() == "memory-maintenance"]
    other = FileLock(tmp_path / "maintenance.lock")
    assert await other.acquire(blocking=False)  # another process may take over
    other.release()


async def test_one_process_maintains_a_shared_directory_and_another_takes_over(
    tmp_path, embedder, memory_config
):
    """Two stores on one directory stand for two gateway processes: only the
    holder of the maintenance lock optimizes, and it folds in the other's writes."""
    config = MaintenanceConfig(interval_seconds=0.05, optimize_after_writes=1)
    first = await MemoryStore.open(tmp_path / "memory", embedder, memory_config)
    second = await MemoryStore.open(tmp_path / "memory", embedder, memory_config)
    leader = Maintenance(first, config, FileLock(tmp_path / "maintenance.lock"))
    follower = Maintenance(second, config, FileLock(tmp_path / "maintenance.lock"))
    leader.start()
    await wait_until(lambda: leader._lock is not None and leader._lock.held)
    follower.start()
    try:
        await second.add(ALICE, "written by the second process")
        await wait_until(lambda: leader.runs >= 1)
        assert follower.runs == 0
        # The follower forgets its own count: the leader saw the write by version.
        await wait_until(lambda: second.writes_since_optimize == 0)

        await leader.stop()  # the leading process exits: its lock is free
        await second.add(ALICE, "another fact")
        await wait_until(lambda: follower.runs >= 1)
        assert await second.count(ALICE) == 2
    finally:
        await leader.stop()
        await follower.stop()
        await first.close()
        await second.close()


async def test_the_file_lock_is_exclusive_and_freed_on_release(tmp_path):
    one, two = FileLock(tmp_path / "x.lock"), FileLock(tmp_path / "x.lock")
    assert await one.acquire(blocking=False)
    assert not await two.acquire(blocking=False)
    one.release()
    assert await two.acquire(blocking=False)
    two.release()


async def test_optimizing_again_and_again_leaves_no_file_open_behind(store, tmp_path):
    """LanceDB's session cache would keep every superseded index file open
    (found by the soak: ~2 descriptors a minute, forever)."""

    def open_store_files() -> int:
        root = str(tmp_path / "memory")
        count = 0
        for fd in os.listdir("/proc/self/fd"):
            with contextlib.suppress(OSError):
                count += os.readlink(f"/proc/self/fd/{fd}").startswith(root)
        return count

    async def writes_then_optimize(round: int) -> None:
        for user in range(20):
            await store.add(Scope(user_id=f"user-{user}"), f"fact {round} of user {user}")
        await store.optimize()

    for round in range(2):
        await writes_then_optimize(round)
    before = open_store_files()
    for round in range(2, 10):
        await writes_then_optimize(round)
    assert open_store_files() <= before + 2
    assert await store.count(Scope(user_id="user-7")) == 10


async def test_maintenance_waits_for_a_commit_in_progress_elsewhere(tmp_path):
    """Writers hold the store's write lock shared while they commit and log;
    maintenance takes it exclusively, so no foreign version lands in its span."""
    store = await MemoryStore.open(tmp_path / "m", HashEmbedder(), cached())
    try:
        await store.add(ALICE, "Plays the violin")
        writer = FileLock(tmp_path / "m" / WRITES_LOCK, shared=True)
        assert await writer.acquire()
        optimizing = asyncio.ensure_future(store.optimize())
        await asyncio.sleep(0.3)
        assert not optimizing.done()
        writer.release()
        await asyncio.wait_for(optimizing, 30)
    finally:
        await store.close()
