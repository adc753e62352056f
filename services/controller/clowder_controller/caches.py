"""Stopping prefix caches without letting one stuck watch cancellation hang a controller's shutdown."""

from __future__ import annotations

import asyncio
import logging

from clowder_common.etcd import PrefixCache

log = logging.getLogger(__name__)

# aetcd can wait forever when a watch is cancelled while it is still being created
# (seen when a controller steps down right after it was elected); closing the
# client later releases it.
STOP_TIMEOUT_S = 3.0


async def stop_caches(caches: list[PrefixCache], timeout: float = STOP_TIMEOUT_S) -> None:
    stoppers = [asyncio.ensure_future(cache.stop()) for cache in caches]
    _, pending = await asyncio.wait(stoppers, timeout=timeout)
    if pending:
        log.warning("%d watch(es) did not stop within %.0fs; left to the client's close", len(pending), timeout)
