"""The extraction process's CPU priority (gateway/priority.py): background
while the spool keeps up, normal while memory lags behind, normal to stop."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap

import pytest

from gateway.priority import PriorityGuard, background_supported


class Lag:
    """The spool's lag, as a script of values (the last one repeats)."""

    def __init__(self, *values: float) -> None:
        self.values = list(values)

    async def __call__(self) -> float:
        return self.values.pop(0) if len(self.values) > 1 else self.values[0]


async def run_checks(guard: PriorityGuard, applied: list[bool], count: int) -> None:
    task = asyncio.ensure_future(guard.run())
    while len(applied) < count:
        await asyncio.sleep(0.001)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_background_until_the_lag_passes_the_limit_then_normal_until_caught_up():
    applied: list[bool] = []
    lag = Lag(0, 3, 10, 12, 6, 4, 0)
    guard = PriorityGuard(lag, 10, interval=0, apply=applied.append)
    await run_checks(guard, applied, 8)
    # Start, then one check per lag value: over 10 switches to normal, and
    # only under half the limit (5) back to background.
    assert applied[:8] == [True, True, True, True, False, False, True, True]


async def test_stopping_restores_normal_priority():
    applied: list[bool] = []
    guard = PriorityGuard(Lag(0), 10, interval=0, apply=applied.append)
    await run_checks(guard, applied, 3)
    assert applied[0] is True
    assert applied[-1] is False


async def test_a_failing_lag_reading_keeps_the_priority_and_the_guard_running():
    applied: list[bool] = []
    readings = iter([OSError("disk I/O error"), 20.0])

    async def lag() -> float:
        value = next(readings, 20.0)
        if isinstance(value, Exception):
            raise value
        return value

    guard = PriorityGuard(lag, 10, interval=0, apply=applied.append)
    await run_checks(guard, applied, 2)
    assert applied[:2] == [True, False]


async def test_a_system_that_refuses_the_change_leaves_the_guard_stopped(caplog):
    def refuse(background: bool) -> None:
        raise PermissionError("Operation not permitted")

    guard = PriorityGuard(Lag(0), 10, interval=0, apply=refuse)
    await asyncio.wait_for(guard.run(), timeout=5)
    assert "cannot change the extraction process's CPU priority" in caplog.text


PROBE = textwrap.dedent(
    """
    import os, threading
    from gateway.priority import set_background
    from memory.spool import THREAD_NAME

    stop = threading.Event()
    before = threading.Thread(target=stop.wait)
    spool = threading.Thread(target=stop.wait, name=THREAD_NAME + "_0")
    before.start()
    spool.start()

    def policies():
        return sorted(os.sched_getscheduler(int(t)) for t in os.listdir("/proc/self/task"))

    set_background(True)
    late = threading.Thread(target=stop.wait)  # started after the switch
    late.start()
    # Every thread idle, the new one included, but the spool's.
    print(os.sched_getscheduler(spool.native_id) == os.SCHED_OTHER)
    print(policies() == [os.SCHED_OTHER] + [os.SCHED_IDLE] * 3)
    set_background(False)
    print(policies() == [os.SCHED_OTHER] * 4)
    stop.set()
    """
)


@pytest.mark.skipif(not background_supported(), reason="Linux scheduling policies")
def test_every_thread_but_the_spools_switches_both_ways():
    # In a child process: the policy must not leak into the test run.
    out = subprocess.run(
        [sys.executable, "-c", PROBE],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["True", "True", "True"]
