"""peer://HOST:PORT/sha256:<hex>: a blob another node's storage already holds, streamed by its ReadBlob RPC."""

from __future__ import annotations

import asyncio
import contextlib
import urllib.parse
from typing import AsyncIterator

import grpc

from clowder.storage.v1 import storage_pb2, storage_pb2_grpc
from clowder_common.auth import bearer_metadata
from clowder_common.clients import aio_channel
from clowder_common.errors import InvalidArgument, Unavailable, from_rpc_error

from clowder_storage.sources import FIELD, NO_CREDENTIAL, Credential, Opened
from clowder_storage.store import parse_digest


def parse_peer(url: str) -> tuple[str, str]:
    parts = urllib.parse.urlsplit(url)
    if not parts.hostname or not parts.port or parts.query or parts.fragment or parts.username:
        raise InvalidArgument("peer:// URLs look like peer://HOST:PORT/sha256:<hex>", field=FIELD)
    digest = parts.path.lstrip("/")
    parse_digest(digest, field=FIELD)
    return f"{parts.hostname}:{parts.port}", digest


class PeerFetcher:
    """Reads from another node's StorageService with the cluster's admin token; resumes by offset."""

    schemes = ("peer",)

    def __init__(self, admin_token: str | None, read_timeout_s: float) -> None:
        self._metadata = bearer_metadata(admin_token)
        self._timeout = read_timeout_s
        self._channels: dict[str, grpc.aio.Channel] = {}

    def check(self, parts: urllib.parse.SplitResult, url: str) -> None:
        parse_peer(url)

    def _stub(self, address: str) -> storage_pb2_grpc.StorageServiceStub:
        channel = self._channels.get(address)
        if channel is None:
            channel = self._channels[address] = aio_channel(address)
        return storage_pb2_grpc.StorageServiceStub(channel)

    async def close(self) -> None:
        channels, self._channels = self._channels, {}
        for channel in channels.values():
            with contextlib.suppress(Exception):
                await channel.close()

    @contextlib.asynccontextmanager
    async def open(self, url: str, *, start: int = 0, end: int | None = None,
                   credential: Credential = NO_CREDENTIAL, validator: str = "") -> AsyncIterator[Opened]:
        address, digest = parse_peer(url)
        length = 0 if end is None else max(end - start, 0)
        call = self._stub(address).ReadBlob(
            storage_pb2.ReadBlobRequest(digest=digest, offset=start, length=length), metadata=self._metadata)
        try:
            first = await self._next(call, address)
            total = first.size_bytes if first is not None else start
            stop = total if end is None else min(end, total)
            yield Opened(self._chunks(call, first, address), max(stop - start, 0), total, start=start,
                         ranges=True, validator=digest, digest=digest)
        finally:
            call.cancel()

    async def _next(self, call, address: str) -> storage_pb2.ReadBlobResponse | None:
        try:
            message = await asyncio.wait_for(call.read(), self._timeout)
        except grpc.aio.AioRpcError as err:
            raise from_rpc_error(err) from None
        except asyncio.TimeoutError:
            raise Unavailable(f"peer {address} stalled", reason="SOURCE_TIMEOUT") from None
        return None if message is grpc.aio.EOF else message

    async def _chunks(self, call, first: storage_pb2.ReadBlobResponse | None, address: str) -> AsyncIterator[bytes]:
        message = first
        while message is not None:
            yield message.data
            message = await self._next(call, address)
