"""Helpers of the REST bridge tests: authenticated JSON calls (waiting: tests/helpers/wait)."""

from __future__ import annotations

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

