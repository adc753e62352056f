"""Load reports: per deployment in-flight, waiting and request counts, written to load/<balancer> under a lease."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass

from google.protobuf.timestamp_pb2 import Timestamp

from clowder.balancer.v1 import load_pb2
from clowder_common import keys
from clowder_common.etcd import EtcdState, LeaseKeeper
from clowder_common.tasks import cancel_and_wait, run_periodically

log = logging.getLogger(__name__)


@dataclass
class _DeploymentLoad:
    in_flight: int = 0
    waiting: int = 0
    requests_total: int = 0
    last_request_time: float = 0.0


class LoadTracker:
    """Counters the router keeps per deployment (model) name."""

    def __init__(self) -> None:
        self._loads: dict[str, _DeploymentLoad] = {}
        # Set when a request starts waiting for a replica: the reporter (which waits on it) reports at once,
        # so activation of a deployment scaled to zero does not lag a tick.
        self.started_waiting = asyncio.Event()

    def _get(self, model: str) -> _DeploymentLoad:
        return self._loads.setdefault(model, _DeploymentLoad())

    def request(self, model: str) -> None:
        load = self._get(model)
        load.requests_total += 1
        load.last_request_time = time.time()

    @contextlib.contextmanager
    def waiting(self, model: str):
        self._get(model).waiting += 1
        self.started_waiting.set()
        try:
            yield
        finally:
            self._get(model).waiting -= 1

    @contextlib.contextmanager
    def in_flight(self, model: str):
        self._get(model).in_flight += 1
        try:
            yield
        finally:
            self._get(model).in_flight -= 1

    def snapshot(self, balancer: str) -> load_pb2.BalancerLoad:
        report = load_pb2.BalancerLoad(balancer=balancer)
        report.report_time.GetCurrentTime()
        for model, load in self._loads.items():
            entry = report.deployments[model]
            entry.in_flight = max(0, load.in_flight)
            entry.waiting = max(0, load.waiting)
            entry.requests_total = load.requests_total
            if load.last_request_time:
                stamp = Timestamp()
                stamp.FromNanoseconds(int(load.last_request_time * 1e9))
                entry.last_request_time.CopyFrom(stamp)
        return report


class LoadReporter:
    """Writes the tracker's snapshot every `interval_s` on a lease, so a dead balancer's report disappears."""

    def __init__(self, state: EtcdState, tracker: LoadTracker, balancer: str,
                 interval_s: float = 1.0, lease_ttl_s: int = 5) -> None:
        self._state = state
        self._tracker = tracker
        self._balancer = balancer
        self._key = state.key(keys.load(balancer))
        self._interval = interval_s
        self._lease = LeaseKeeper(state, lease_ttl_s, self._write)
        self._task: asyncio.Task | None = None

    async def _write(self, lease_id: int) -> None:
        await self._state.put(self._key, self._tracker.snapshot(self._balancer), lease=lease_id)

    async def start(self) -> None:
        await self._lease.start()
        # A failed report (etcd down) is retried at the next tick; the lease TTL bounds how stale it gets.
        self._task = asyncio.create_task(
            run_periodically(self._report, self._interval, self._tracker.started_waiting, "load report"),
            name="load-reporter")

    async def _report(self) -> None:
        lease = self._lease.lease_id
        if lease is not None:
            await asyncio.wait_for(self._write(lease), timeout=max(1.0, self._interval * 2))

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._lease.stop(), timeout=3.0)
