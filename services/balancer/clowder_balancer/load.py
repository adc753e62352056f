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
from clowder_common.etcd import EtcdState

from clowder_balancer.leased_report import LeasedReport

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


class LoadReporter(LeasedReport):
    """Writes the tracker's snapshot to load/<balancer> every `interval_s`, and at once when a request starts
    waiting for a replica (other balancers route around a queue sooner)."""

    def __init__(self, state: EtcdState, tracker: LoadTracker, balancer: str,
                 interval_s: float = 1.0, lease_ttl_s: int = 5) -> None:
        super().__init__(state, state.key(keys.load(balancer)), lambda: tracker.snapshot(balancer), "load report",
                         interval_s=interval_s, lease_ttl_s=lease_ttl_s, wake=tracker.started_waiting)
