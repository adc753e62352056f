"""Polls every registered runtime's GetStats, so routing sees queues that other balancers filled too."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Callable

import grpc

from clowder.runtime.v1 import runtime_pb2

from clowder_common.tasks import cancel_and_wait

from clowder_balancer.channels import ChannelPool

log = logging.getLogger(__name__)

# Polls that must fail in a row before a replica counts as unreachable (one can be a blip).
UNREACHABLE_AFTER = 2


@dataclass
class RuntimeStats:
    running: int = 0
    waiting: int = 0
    failures: int = 0
    adapters: frozenset[str] = frozenset()
    # Distinct prefix blocks the runtime says its KV cache holds, and tokens per block (0: not reported).
    prefix_blocks: int = 0
    prefix_block_tokens: int = 0
    # Sequence slots (0: not reported yet); the fair queue's capacity.
    slots: int = 0

    @property
    def reachable(self) -> bool:
        return self.failures < UNREACHABLE_AFTER


class StatsPoller:
    def __init__(self, channels: ChannelPool, addresses: Callable[[], set[str]],
                 interval_s: float = 0.5, timeout_s: float = 1.0,
                 on_stats: Callable[[str, RuntimeStats], None] | None = None) -> None:
        self._channels = channels
        self._addresses = addresses
        self._interval = interval_s
        self._timeout = timeout_s
        self._on_stats = on_stats
        self._stats: dict[str, RuntimeStats] = {}
        self._task: asyncio.Task | None = None

    def get(self, address: str) -> RuntimeStats:
        return self._stats.get(address) or RuntimeStats()

    async def start(self) -> None:
        if self._interval > 0:
            self._task = asyncio.create_task(self._run(), name="stats-poller")

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None

    async def _run(self) -> None:
        while True:
            try:
                await self.poll_once()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # never let one bad poll end polling
                log.warning("stats poll failed: %s", exc)
            await asyncio.sleep(self._interval)

    async def poll_once(self) -> None:
        addresses = self._addresses()
        for gone in set(self._stats) - addresses:
            del self._stats[gone]
        await asyncio.gather(*(self._poll(a) for a in addresses))

    async def _poll(self, address: str) -> None:
        stats = self._stats.setdefault(address, RuntimeStats())
        try:
            async with self._channels.stub(address) as stub:
                reply = await stub.GetStats(runtime_pb2.GetStatsRequest(), timeout=self._timeout)
        except grpc.aio.AioRpcError as err:
            stats.failures += 1
            log.debug("GetStats on %s failed: %s", address, err.code().name)
            return
        stats.running = reply.num_requests_running
        stats.waiting = reply.num_requests_waiting
        stats.failures = 0
        stats.adapters = frozenset(reply.adapters)
        stats.prefix_blocks = len(set(reply.prefix_block_hashes))
        stats.prefix_block_tokens = reply.prefix_block_tokens
        stats.slots = reply.slots
        if self._on_stats is not None:
            self._on_stats(address, stats)
