"""This node's record in etcd (nodes/<name>), held on a lease and refreshed when the store changes."""

from __future__ import annotations

import asyncio
import logging
import os
import pathlib
import re
import time
from typing import Mapping

from google.protobuf import timestamp_pb2

from clowder.controller.v1 import resources_pb2
from clowder_common import keys
from clowder_common.etcd import EtcdState, LeaseKeeper
from clowder_common.tasks import cancel_and_wait, run_periodically

from clowder_storage.store import BlobStore

log = logging.getLogger(__name__)


# The node record lives in one etcd value (1.5 MiB at most): list at most this many digests, largest first,
# since the scheduler's locality score cares about model layers, not small configs.
MAX_PUBLISHED_DIGESTS = 1000
NVIDIA_DEVICE = re.compile(r"^nvidia\d+$")


def total_memory_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def count_gpus(dev: pathlib.Path = pathlib.Path("/dev")) -> int:
    """NVIDIA GPUs visible to this node (one /dev/nvidia<N> per device)."""
    try:
        return sum(1 for entry in dev.iterdir() if NVIDIA_DEVICE.match(entry.name))
    except OSError:
        return 0


class NodeRegistration:
    """Publishes the Node while the service runs; stop() revokes the lease so the node vanishes at once."""

    def __init__(
        self,
        state: EtcdState,
        store: BlobStore,
        node_name: str,
        labels: Mapping[str, str],
        lease_ttl_s: int,
        refresh_s: float = 60.0,
        gpus: int = 0,
    ) -> None:
        self._gpus = gpus
        self._state = state
        self._store = store
        self.key = state.key(keys.node(node_name))
        self._name = node_name
        # Known once the server has bound its port; see start().
        self._address = ""
        self._labels = dict(labels)
        self._refresh_s = refresh_s
        self._start_time = timestamp_pb2.Timestamp()
        self._start_time.FromNanoseconds(time.time_ns())
        self._keeper = LeaseKeeper(state, lease_ttl_s, self._write)
        self._changed = asyncio.Event()
        self._task: asyncio.Task | None = None

    async def node(self) -> resources_pb2.Node:
        blobs = sorted(await self._store.list(), key=lambda b: b.size_bytes, reverse=True)
        return resources_pb2.Node(
            name=self._name,
            storage_address=self._address,
            labels=self._labels,
            memory_bytes=total_memory_bytes(),
            cpus=os.cpu_count() or 1,
            store_free_bytes=await self._store.free_bytes(),
            start_time=self._start_time,
            gpus=self._gpus,
            blob_digests=[b.digest for b in blobs[:MAX_PUBLISHED_DIGESTS]],
        )

    async def _write(self, lease_id: int) -> None:
        await self._state.put(self.key, await self.node(), lease=lease_id)
        log.info("registered node %s at %s", self._name, self._address)

    async def start(self, storage_address: str) -> None:
        self._address = storage_address
        await self._keeper.start()
        # etcd down: the pass fails and the lease keeper re-registers once it is back.
        self._task = asyncio.create_task(
            run_periodically(self._refresh, self._refresh_s, self._changed, f"refreshing node {self._name}"),
            name="node-refresh")

    @property
    def lease_id(self) -> int | None:
        """The lease this node's keys live on; None while not registered."""
        return self._keeper.lease_id

    @property
    def address(self) -> str:
        return self._address

    async def publish(self) -> None:
        """Write the node record now (its blob list included), not at the next refresh."""
        await self._refresh()

    def store_changed(self) -> None:
        """Free space moved (pull or delete): publish the new number soon, without blocking the caller."""
        self._changed.set()

    async def _refresh(self) -> None:
        lease_id = self._keeper.lease_id
        if lease_id is not None:
            await self._state.put(self.key, await self.node(), lease=lease_id)

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None
        await self._keeper.stop()
