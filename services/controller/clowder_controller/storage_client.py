"""Calls from the controller to a node's StorageService, with the admin token and deadlines."""

from __future__ import annotations

import contextlib
from typing import AsyncIterator

import grpc

from clowder.storage.v1 import storage_pb2, storage_pb2_grpc
from clowder_common.auth import bearer_metadata
from clowder_common.clients import aio_channel
from clowder_common.errors import from_rpc_error

# A pull of tens of gigabytes on a slow link is legitimately long; a hung one is not forever.
PULL_DEADLINE_S = 6 * 3600
CALL_DEADLINE_S = 10


class StorageClients:
    """One channel per storage address, reused across calls."""

    def __init__(self, admin_token: str | None) -> None:
        self._metadata = bearer_metadata(admin_token)
        self._channels: dict[str, grpc.aio.Channel] = {}

    def _stub(self, address: str) -> storage_pb2_grpc.StorageServiceStub:
        channel = self._channels.get(address)
        if channel is None:
            channel = self._channels[address] = aio_channel(address)
        return storage_pb2_grpc.StorageServiceStub(channel)

    async def pull(self, address: str, source_url: str, expected_digest: str = "") -> AsyncIterator[
            storage_pb2.PullBlobResponse]:
        """Relays the node's pull progress; storage errors come back as ClowderError."""
        call = self._stub(address).PullBlob(
            storage_pb2.PullBlobRequest(source_url=source_url, expected_digest=expected_digest),
            metadata=self._metadata,
            timeout=PULL_DEADLINE_S,
        )
        try:
            async for message in call:
                yield message
        except grpc.aio.AioRpcError as err:
            raise from_rpc_error(err) from None
        finally:
            call.cancel()

    async def stat(self, address: str, digest: str) -> storage_pb2.Blob | None:
        try:
            reply = await self._stub(address).StatBlob(
                storage_pb2.StatBlobRequest(digest=digest), metadata=self._metadata, timeout=CALL_DEADLINE_S
            )
        except grpc.aio.AioRpcError as err:
            if err.code() == grpc.StatusCode.NOT_FOUND:
                return None
            raise from_rpc_error(err) from None
        return reply.blob

    async def close(self) -> None:
        channels, self._channels = self._channels, {}
        for channel in channels.values():
            with contextlib.suppress(Exception):
                await channel.close()
