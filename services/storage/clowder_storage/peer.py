"""peer://HOST:PORT/sha256:<hex>: a blob another node's storage already holds, streamed by its ReadBlob RPC."""

from __future__ import annotations

import asyncio
import contextlib
import random
import urllib.parse
from typing import AsyncGenerator, AsyncIterator, Protocol

import grpc

from clowder.controller.v1 import resources_pb2
from clowder.storage.v1 import storage_pb2
from clowder_common import keys
from clowder_common.auth import bearer_metadata
from clowder_common.clients import StorageStubs
from clowder_common.errors import AlreadyExists, InvalidArgument, Unavailable, from_rpc_error
from clowder_common.etcd import EtcdState
from clowder_common.security import NO_SECURITY, ClusterSecurity

from clowder_storage.sources import FIELD, NO_CREDENTIAL, Credential, Opened
from clowder_storage.store import parse_digest

# pulls/<sha256-hex...>: the node reading that blob from its origin right now (on that node's lease).
PULLS = "pulls"


def parse_peer(url: str) -> tuple[str, str]:
    parts = urllib.parse.urlsplit(url)
    if not parts.hostname or not parts.port or parts.query or parts.fragment or parts.username:
        raise InvalidArgument("peer:// URLs look like peer://HOST:PORT/sha256:<hex>", field=FIELD)
    digest = parts.path.lstrip("/")
    parse_digest(digest, field=FIELD)
    return f"{parts.hostname}:{parts.port}", digest


class PeerFetcher:
    """Reads from another node's StorageService as a cluster component; resumes by offset."""

    schemes = ("peer",)

    def __init__(self, admin_token: str | None, read_timeout_s: float,
                 security: ClusterSecurity = NO_SECURITY) -> None:
        self._metadata = bearer_metadata(admin_token)
        self._timeout = read_timeout_s
        self._stub = StorageStubs(security)

    def check(self, parts: urllib.parse.SplitResult, url: str) -> None:
        parse_peer(url)

    async def close(self) -> None:
        await self._stub.close()

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

    async def _chunks(self, call, first: storage_pb2.ReadBlobResponse | None,
                      address: str) -> AsyncGenerator[bytes, None]:
        message = first
        while message is not None:
            yield message.data
            message = await self._next(call, address)


class NodeLease(Protocol):
    """What the peer directory needs of this node's registration (registration.NodeRegistration)."""

    @property
    def lease_id(self) -> int | None: ...

    @property
    def address(self) -> str: ...

    async def publish(self) -> None: ...


def pull_claim_key(state: EtcdState, digest: str) -> str:
    return state.key(PULLS, digest.replace(":", "-"))


class PeerDirectory:
    """Where else in the cluster a blob is: the nodes that list it (nodes/<name>) and the one node that is
    fetching it from its origin (pulls/<digest>, created on that node's lease so it vanishes with the node).

    The claim is what makes the origin read once per blob per cluster: only the node that created it reads
    the origin; every other node waits for it to go, then copies from a node that holds the blob.
    """

    def __init__(self, state: EtcdState, node_name: str, node: NodeLease, fetcher: PeerFetcher,
                 poll_s: float = 0.25) -> None:
        self._state = state
        self._name = node_name
        self._node = node
        self.fetcher = fetcher
        self._poll = poll_s

    async def holders(self, digest: str) -> list[str]:
        """peer:// URLs of the other live nodes that list `digest`, in random order to spread the load."""
        nodes, _ = await self._state.list(self._state.key(keys.NODES), resources_pb2.Node)
        urls = [f"peer://{n.value.storage_address}/{digest}" for n in nodes
                if n.value.name != self._name and n.value.storage_address and digest in n.value.blob_digests]
        random.shuffle(urls)
        return urls

    async def claim(self, digest: str) -> bool:
        """Become the node that reads `digest` from its origin; False when another node already is."""
        lease = self._node.lease_id
        if lease is None:
            # Not registered (etcd was away): a claim without a lease could outlive this node; read the origin.
            return True
        key = pull_claim_key(self._state, digest)
        value = resources_pb2.Node(name=self._name, storage_address=self._node.address)
        for _ in range(2):
            try:
                await self._state.create(key, value, lease=lease)
                return True
            except AlreadyExists:
                held = await self._state.get(key, resources_pb2.Node)
                if held is None:
                    continue
                if held.value.name != self._name:
                    return False
                # Our own claim from before a restart (same node name, older lease): this process takes over.
                await self._state.delete(key, held.mod_revision)
        return False

    async def claimant(self, digest: str) -> tuple[str, str]:
        """(name, peer:// URL) of the node reading `digest` from its origin now; ("", "") when none is."""
        held = await self._state.get(pull_claim_key(self._state, digest), resources_pb2.Node)
        if held is None or held.value.name == self._name:
            return "", ""
        address = held.value.storage_address
        return held.value.name, f"peer://{address}/{digest}" if address else ""

    async def release(self, digest: str, stored: bool) -> None:
        """Drop our claim; when the blob was stored, publish it first so waiters find it on this node."""
        if stored:
            with contextlib.suppress(Exception):
                await self._node.publish()
        key = pull_claim_key(self._state, digest)
        held = await self._state.get(key, resources_pb2.Node)
        if held is not None and held.value.name == self._name:
            await self._state.delete(key, held.mod_revision)

    async def wait(self) -> None:
        await asyncio.sleep(self._poll)
