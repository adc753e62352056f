"""Background tasks every service runs: periodic passes that can be woken early, and stopping them."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Awaitable, Callable, TypeVar

from clowder_common.errors import ClowderError

log = logging.getLogger(__name__)

T = TypeVar("T")


# cancel_and_wait gives up on a task that has not unwound after this long (and says so).
CANCEL_TIMEOUT_S = 30.0


async def cancel_and_wait(task: asyncio.Task | None, timeout: float = CANCEL_TIMEOUT_S) -> None:
    """Cancel `task` and wait until it has unwound (no-op for None or a finished task).

    Cancels again every second: on Python 3.11 `asyncio.wait_for` drops a cancellation that arrives as its
    awaitable completes, and a loop built on it then runs on (this hung the controller's stop). Bounded: a
    task still running after `timeout` is left, with a warning, instead of hanging the caller.
    """
    if task is None:
        return
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not task.done():
        task.cancel()
        left = deadline - loop.time()
        if left <= 0:
            log.warning("task %s did not stop within %.0fs; left running", task.get_name(), timeout)
            return
        try:
            await asyncio.wait({task}, timeout=min(1.0, left))
        except asyncio.CancelledError:
            task.cancel()
            raise
    with contextlib.suppress(asyncio.CancelledError):
        task.result()


async def wait_event(event: asyncio.Event, timeout: float) -> bool:
    """Wait for `event` at most `timeout` seconds; True when it is set.

    Unlike `asyncio.wait_for(event.wait(), ...)` on Python 3.11, a cancellation that arrives as the event is
    set is never lost.
    """
    if event.is_set():
        return True
    try:
        async with asyncio.timeout(timeout):
            await event.wait()
    except TimeoutError:
        return event.is_set()
    return True


async def bounded(awaitable: Awaitable[T], timeout: float) -> T:
    """The result of `awaitable`, or TimeoutError after `timeout` s; never waits longer, even for its cancellation.

    For calls whose cancellation can itself block (a grpc stream torn down mid-creation): on timeout the
    work is cancelled and left to finish unwinding in the background.
    """
    task = asyncio.ensure_future(awaitable)
    try:
        done, _ = await asyncio.wait({task}, timeout=timeout)
    except asyncio.CancelledError:
        task.cancel()
        task.add_done_callback(_retrieve)
        raise
    if not done:
        task.cancel()
        task.add_done_callback(_retrieve)
        raise TimeoutError(f"no answer within {timeout:.1f}s")
    return task.result()


def _retrieve(task: asyncio.Future) -> None:
    """Mark an abandoned task's outcome as seen, so asyncio does not log it as never retrieved."""
    if not task.cancelled():
        task.exception()


async def run_periodically(step: Callable[[], Awaitable[None]], interval_s: float, wake: asyncio.Event | None,
                           what: str) -> None:
    """Run `step` every `interval_s`, or as soon as `wake` is set; a failing pass is logged and retried next time.

    Runs until cancelled. The step itself must bound its own waits.
    """
    wake = wake or asyncio.Event()
    while True:
        await wait_event(wake, interval_s)
        wake.clear()
        try:
            await step()
        except asyncio.CancelledError:
            raise
        except ClowderError as exc:  # an expected outage (etcd down, a peer gone): one line is enough
            log.warning("%s failed (%s); retrying in %.1fs", what, exc, interval_s)
        except Exception:  # a bug: keep the traceback, and keep the loop alive
            log.exception("%s failed; retrying in %.1fs", what, interval_s)
