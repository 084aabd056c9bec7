"""Background maintenance: optimize after bursts of writes, survive failures."""

from __future__ import annotations

import asyncio

from memory.config import MaintenanceConfig
from memory.maintenance import Maintenance
from memory.models import Scope

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


async def test_stop_is_idempotent(store):
    maintenance = Maintenance(store, MaintenanceConfig())
    maintenance.start()
    await maintenance.stop()
    await maintenance.stop()
