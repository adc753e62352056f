"""Periodic passes: woken early, surviving failures, stopped cleanly."""

from __future__ import annotations

import asyncio

from clowder_common.errors import Unavailable
from clowder_common.tasks import cancel_and_wait, run_periodically


async def test_wake_runs_a_pass_before_the_interval():
    ran = asyncio.Event()
    wake = asyncio.Event()

    async def step() -> None:
        ran.set()

    task = asyncio.create_task(run_periodically(step, 3600, wake, "test pass"))
    wake.set()
    await asyncio.wait_for(ran.wait(), 2)
    await cancel_and_wait(task)
    assert task.cancelled()


async def test_failing_passes_do_not_end_the_loop():
    calls = 0

    async def step() -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise Unavailable("etcd down")
        if calls == 2:
            raise RuntimeError("a bug")

    task = asyncio.create_task(run_periodically(step, 0.01, None, "test pass"))
    for _ in range(200):
        if calls >= 3:
            break
        await asyncio.sleep(0.01)
    await cancel_and_wait(task)
    assert calls >= 3


async def test_cancel_and_wait_accepts_none_and_finished_tasks():
    await cancel_and_wait(None)
    done = asyncio.create_task(asyncio.sleep(0))
    await done
    await cancel_and_wait(done)
