"""Helpers of the REST bridge tests: authenticated JSON calls and bounded waiting."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp

TOKEN = "rest-bridge-test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


async def call(session: aiohttp.ClientSession, method: str, url: str, *, auth: bool = True,
               **kwargs) -> tuple[int, Any]:
    headers = dict(AUTH if auth else {})
    headers.update(kwargs.pop("headers", {}))
    async with session.request(method, url, headers=headers, **kwargs) as response:
        return response.status, await response.json(content_type=None)


async def eventually(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while True:
        result = await predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.2)
