"""Shared constants and bounded waiting for the SDK tests."""

from __future__ import annotations

import asyncio
import time

TOKEN = "sdk-test-admin-token"
MODEL = "smol"
CHAT = [{"role": "user", "content": "Name three colours."}]


async def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while True:
        result = await predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.2)
