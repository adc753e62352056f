"""Request ids on every log line: the filter tags records logged while a request is handled, by any logger."""

from __future__ import annotations

import asyncio
import logging

import pytest

from clowder_balancer import logcontext

pytestmark = pytest.mark.unit


class Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


async def test_records_logged_inside_a_request_carry_its_id() -> None:
    handler = Capture()
    handler.addFilter(logcontext.RequestIdFilter())
    logger = logging.getLogger("some.library")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        async def handle(rid: str) -> None:
            logcontext.REQUEST_ID.set(rid)
            await asyncio.sleep(0)
            logger.info("working on %s", "it")

        await asyncio.gather(asyncio.create_task(handle("r-1")), asyncio.create_task(handle("r-2")))
        logger.info("between requests")
        logger.info("request_id=explicit already tagged")
    finally:
        logger.removeHandler(handler)
    assert sorted(handler.lines[:2]) == ["request_id=r-1 working on it", "request_id=r-2 working on it"]
    assert handler.lines[2:] == ["between requests", "request_id=explicit already tagged"]
