"""One gRPC channel per runtime address, closed once its endpoint is gone and no request still uses it."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from typing import AsyncIterator, Iterable

import grpc

from clowder.runtime.v1 import runtime_pb2_grpc
from clowder_common.clients import aio_channel
from clowder_common.security import NO_SECURITY, ClusterSecurity

log = logging.getLogger(__name__)


@dataclass
class _Entry:
    channel: grpc.aio.Channel
    stub: runtime_pb2_grpc.RuntimeServiceStub
    users: int = 0


class ChannelPool:
    def __init__(self, security: ClusterSecurity = NO_SECURITY) -> None:
        # Runtimes take calls only from cluster components: the service credential (and TLS) on every channel.
        self._security = security
        self._entries: dict[str, _Entry] = {}
        # Addresses some endpoint currently registers; None until the first sync (keep everything).
        self._live: set[str] | None = None
        self._closing: set[asyncio.Task] = set()

    def __len__(self) -> int:
        return len(self._entries)

    def addresses(self) -> set[str]:
        return set(self._entries)

    @contextlib.asynccontextmanager
    async def stub(self, address: str) -> AsyncIterator[runtime_pb2_grpc.RuntimeServiceStub]:
        """A stub on the shared channel to `address`, held open while the block runs."""
        entry = self._entries.get(address)
        if entry is None:
            channel = aio_channel(address, self._security)
            entry = _Entry(channel, runtime_pb2_grpc.RuntimeServiceStub(channel))
            self._entries[address] = entry
        entry.users += 1
        try:
            yield entry.stub
        finally:
            entry.users -= 1
            self._reap()

    def sync(self, live: Iterable[str]) -> None:
        """Record which addresses are registered now; channels to the others close once idle.

        A replica that deregisters while draining still finishes the streams it
        carries, so a channel in use is never closed under them.
        """
        self._live = set(live)
        self._reap()

    def _reap(self) -> None:
        if self._live is None:
            return
        for address in [a for a, e in self._entries.items() if e.users == 0 and a not in self._live]:
            entry = self._entries.pop(address)
            log.info("closing channel to %s (endpoint gone)", address)
            self._close_soon(entry.channel)

    def _close_soon(self, channel: grpc.aio.Channel) -> None:
        task = asyncio.get_running_loop().create_task(channel.close())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def close(self) -> None:
        entries, self._entries = list(self._entries.values()), {}
        await asyncio.gather(*(e.channel.close() for e in entries), *self._closing, return_exceptions=True)
