"""A runtime whose threads were not set follows the number of runtimes on its node.

llama.cpp threads spin at barriers: with more threads than cores on a node, every runtime there slows to a
crawl (measured: 3 threads on 2 cores, a 2-thread replica's median request took 87 s against 1.7 s). Threads
were fixed when a runtime started, so the replica started alone kept every core after the node got a second
one. Each sharing runtime now watches the registered endpoints and runs on its share of the node's CPUs.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Callable, Iterable

from clowder.runtime.v1 import runtime_pb2

from clowder_common import keys
from clowder_common.errors import Unavailable
from clowder_common.security import Tls
from clowder_common.etcd import EtcdState, PrefixCache
from clowder_common.runtime_settings import MAX_THREADS
from clowder_common.tasks import cancel_and_wait

log = logging.getLogger(__name__)

# Between attempts to connect while etcd does not answer.
RETRY_S = 1.0


def runtimes_on_node(node: str, own_key: str, endpoints: Iterable[tuple[str, str]]) -> int:
    """Runtimes registered on `node`, this one counted even before it registered (its endpoint appears only
    once its model is loaded). `endpoints`: (key, node) of every registered endpoint."""
    return len({key for key, on in endpoints if on == node} | {own_key})


def share_of_node(node_cpus: int, runtimes: int) -> int:
    """Threads for each of `runtimes` runtimes on a node with `node_cpus` CPUs; at least one."""
    return min(MAX_THREADS, max(1, node_cpus // max(1, runtimes)))


class NodeShare:
    """Watches endpoints/ and calls `apply(threads)` whenever this runtime's share of its node changes.

    While etcd does not answer the watch keeps its last copy, so the runtime keeps its current threads:
    an outage is no news about the node's runtimes.
    """

    def __init__(self, endpoints: tuple[str, ...], prefix: str, node: str, endpoint_key: str, node_cpus: int,
                 apply: Callable[[int], None], etcd_tls: Tls | None = None) -> None:
        """`endpoint_key`: this runtime's endpoint under the prefix (keys.endpoint)."""
        self._state = EtcdState(endpoints, prefix, etcd_tls)
        self._node = node
        self._own_key = self._state.key(endpoint_key)
        self._node_cpus = node_cpus
        self._apply = apply
        self._cache: PrefixCache[runtime_pb2.Endpoint] | None = None
        self._task: asyncio.Task | None = None
        self._changed = asyncio.Event()
        self.threads: int | None = None

    async def start(self) -> None:
        """Never waits on etcd: the runtime keeps the threads it started with until the watch answers."""
        self._task = asyncio.create_task(self._run(), name="node-share")

    async def _run(self) -> None:
        while not self._state.connected:
            try:
                await self._state.connect()
            except Unavailable as exc:
                log.debug("etcd does not answer yet (%s); threads stay as they are", exc)
                await asyncio.sleep(RETRY_S)
        self._cache = PrefixCache(self._state, self._state.key(keys.ENDPOINTS), runtime_pb2.Endpoint,
                                  on_change=self._changed.set)
        await self._cache.start(wait=0)
        while True:
            await self._changed.wait()
            self._changed.clear()
            runtimes = runtimes_on_node(self._node, self._own_key,
                                        ((key, e.node) for key, e in self._cache.items.items()))
            share = share_of_node(self._node_cpus, runtimes)
            if share != self.threads:
                log.info("threads follow node %s: %d cpus shared by %d runtimes -> %d threads", self._node,
                         self._node_cpus, runtimes, share)
                self.threads = share
                self._apply(share)

    async def stop(self) -> None:
        await cancel_and_wait(self._task, timeout=5)
        self._task = None
        if self._cache is not None:
            await self._cache.stop()
        await self._state.close()
