"""Background tasks every service runs: periodic passes that can be woken early, and stopping them."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Awaitable, Callable

from clowder_common.errors import ClowderError

log = logging.getLogger(__name__)


async def cancel_and_wait(task: asyncio.Task | None) -> None:
    """Cancel `task` and wait until it has unwound (no-op for None or a finished task)."""
    if task is None:
        return
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def run_periodically(step: Callable[[], Awaitable[None]], interval_s: float, wake: asyncio.Event | None,
                           what: str) -> None:
    """Run `step` every `interval_s`, or as soon as `wake` is set; a failing pass is logged and retried next time.

    Runs until cancelled. The step itself must bound its own waits.
    """
    wake = wake or asyncio.Event()
    while True:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(wake.wait(), interval_s)
        wake.clear()
        try:
            await step()
        except asyncio.CancelledError:
            raise
        except ClowderError as exc:  # an expected outage (etcd down, a peer gone): one line is enough
            log.warning("%s failed (%s); retrying in %.1fs", what, exc, interval_s)
        except Exception:  # a bug: keep the traceback, and keep the loop alive
            log.exception("%s failed; retrying in %.1fs", what, interval_s)
