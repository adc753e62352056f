"""Periodic passes: woken early, surviving failures, stopped cleanly."""

from __future__ import annotations

import asyncio

import pytest

from clowder_common.errors import Unavailable
from clowder_common.tasks import bounded, cancel_and_wait, run_periodically, wait_event

pytestmark = pytest.mark.unit


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


async def test_a_cancellation_that_arrives_as_the_wake_fires_still_stops_the_loop():
    """Python 3.11's wait_for drops such a cancellation; a reconciler built on it never stopped (the bench hang)."""
    for _ in range(50):
        wake = asyncio.Event()
        task = asyncio.create_task(run_periodically(_nothing, 3600, wake, "test pass"))
        await asyncio.sleep(0.001)
        wake.set()
        await asyncio.wait_for(cancel_and_wait(task), 5)
        assert task.done()


async def test_cancel_and_wait_gives_up_on_a_task_that_will_not_stop():
    async def stubborn() -> None:
        while True:
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError:
                continue

    task = asyncio.create_task(stubborn())
    await asyncio.sleep(0)
    started = asyncio.get_running_loop().time()
    await cancel_and_wait(task, timeout=1.5)
    assert 1.4 < asyncio.get_running_loop().time() - started < 3
    assert not task.done()
    task.get_coro().close()  # type: ignore[union-attr]


async def test_wait_event_never_loses_a_cancellation():
    for _ in range(50):
        event = asyncio.Event()
        task = asyncio.create_task(wait_event(event, 5))
        await asyncio.sleep(0.001)
        event.set()
        task.cancel()
        done, _ = await asyncio.wait({task}, timeout=1)
        assert done and task.cancelled()
    assert not await wait_event(asyncio.Event(), 0.05)


async def test_bounded_does_not_wait_for_a_cancellation_that_blocks():
    release = asyncio.Event()

    async def slow_to_cancel() -> None:
        try:
            await asyncio.sleep(10)
        finally:
            await release.wait()  # a cancellation that itself waits (a grpc stream torn down mid-creation)

    started = asyncio.get_running_loop().time()
    with pytest.raises(TimeoutError):
        await bounded(slow_to_cancel(), 0.2)
    assert asyncio.get_running_loop().time() - started < 1
    release.set()
    assert await bounded(asyncio.sleep(0, result=7), 1) == 7


async def _nothing() -> None:
    return None
