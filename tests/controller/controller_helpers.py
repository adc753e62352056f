"""Bounded waiting shared by the controller tests."""

from __future__ import annotations

import asyncio
import time


async def wait_for(predicate, timeout, what):
    """The first truthy value of `await predicate()`, polled every 0.1 s; AssertionError after `timeout` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = await predicate()
        if value:
            return value
        await asyncio.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")
