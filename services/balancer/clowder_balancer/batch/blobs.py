"""File contents in the storage service: put (pinned per file), read back, unpin; nodes found through etcd."""

from __future__ import annotations

import asyncio
import hashlib
import logging
from typing import AsyncIterator

import grpc

from clowder.controller.v1 import resources_pb2
from clowder.storage.v1 import storage_pb2
from clowder_common import keys
from clowder_common.auth import bearer_metadata
from clowder_common.clients import StorageStubs
from clowder_common.errors import ClowderError, NotFound, Unavailable, from_rpc_error
from clowder_common.etcd import EtcdState
from clowder_common.security import NO_SECURITY, ClusterSecurity

log = logging.getLogger(__name__)

CHUNK_BYTES = 1 << 20
# Storing or reading a 100 MiB file on a busy node is seconds; a hung node is not forever.
CALL_DEADLINE_S = 120


def holder_of(file_id: str) -> str:
    """The pin holder that keeps one file's content from GC (content is shared, pins are per file)."""
    return f"batch-file:{file_id}"


class BlobClient:
    """Talks to the storage nodes registered under nodes/ with the cluster's admin token and credentials."""

    def __init__(self, state: EtcdState, admin_token: str | None, security: ClusterSecurity = NO_SECURITY) -> None:
        self._state = state
        self._metadata = bearer_metadata(admin_token)
        self._stub = StorageStubs(security)

    async def close(self) -> None:
        await self._stub.close()

    async def _nodes(self) -> list[resources_pb2.Node]:
        items, _ = await self._state.list(self._state.key(keys.NODES), resources_pb2.Node)
        return [i.value for i in items if i.value.storage_address]

    async def _address(self, node: str) -> str:
        found = await self._state.get(self._state.key(keys.node(node)), resources_pb2.Node)
        if found is None or not found.value.storage_address:
            raise Unavailable(f"storage node '{node}' that holds the file is not registered", retry_after=5.0,
                              reason="STORAGE_NODE_DOWN", metadata={"node": node})
        return found.value.storage_address

    async def put(self, content: bytes, holder: str) -> tuple[str, str]:
        """Store `content` pinned for `holder` on the registered node with the most free space: (digest, node)."""
        nodes = await self._nodes()
        if not nodes:
            raise Unavailable("no storage node is registered to keep the file", retry_after=5.0,
                              reason="NO_STORAGE_NODE")
        # Hashing up to batch_max_file_bytes is tens of milliseconds: off the event loop.
        digest = "sha256:" + await asyncio.to_thread(lambda: hashlib.sha256(content).hexdigest())
        errors: list[str] = []
        for node in sorted(nodes, key=lambda n: (-n.store_free_bytes, n.name)):
            try:
                reply = await self._stub(node.storage_address).PutBlob(
                    _messages(content, digest, holder), metadata=self._metadata, timeout=CALL_DEADLINE_S)
                return reply.blob.digest, node.name
            except grpc.aio.AioRpcError as err:
                errors.append(f"{node.name}: {err.code().name}")
                log.warning("storing a batch file on node %s failed: %s", node.name, err.code().name)
        raise Unavailable(f"no storage node took the file ({'; '.join(errors)})", retry_after=5.0,
                          reason="STORAGE_UNAVAILABLE")

    async def read(self, node: str, digest: str) -> bytes:
        address = await self._address(node)
        parts: list[bytes] = []
        try:
            async for reply in self._stub(address).ReadBlob(storage_pb2.ReadBlobRequest(digest=digest),
                                                            metadata=self._metadata, timeout=CALL_DEADLINE_S):
                parts.append(reply.data)
        except grpc.aio.AioRpcError as err:
            error = from_rpc_error(err)
            if isinstance(error, NotFound):
                raise NotFound(f"the content of this file ({digest}) is gone from storage node '{node}'",
                               reason="FILE_CONTENT_LOST") from None
            raise Unavailable(f"storage node '{node}' did not return the file: {error.message}",
                              retry_after=5.0) from None
        return b"".join(parts)

    async def unpin(self, node: str, holder: str) -> None:
        """Let GC have the content (once no other file pins it); a node that is gone keeps nothing to free."""
        try:
            address = await self._address(node)
            await self._stub(address).UnpinBlobs(storage_pb2.UnpinBlobsRequest(holder=holder),
                                                 metadata=self._metadata, timeout=10)
        except (ClowderError, grpc.aio.AioRpcError) as exc:
            log.warning("unpinning %s on node %s failed (its blob stays until unpinned by hand): %s", holder,
                        node, exc)


async def _messages(content: bytes, digest: str, holder: str) -> AsyncIterator[storage_pb2.PutBlobRequest]:
    view = memoryview(content)
    yield storage_pb2.PutBlobRequest(data=bytes(view[:CHUNK_BYTES]), expected_digest=digest, holder=holder)
    for start in range(CHUNK_BYTES, len(content), CHUNK_BYTES):
        yield storage_pb2.PutBlobRequest(data=bytes(view[start:start + CHUNK_BYTES]))
