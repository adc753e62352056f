"""The autoscaler: replicas between min and max from the load balancers report, with stabilization windows.

Scale-up follows the lowest recommendation of the (short) up window, scale-down
the highest of the (long) down window, so a burst adds replicas at once and a
lull removes them only once it has lasted. Scale to zero waits for its own idle
time instead; a request held by a balancer (waiting > 0) wakes a deployment at
zero immediately.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import time
from collections import deque

from clowder.balancer.v1 import load_pb2
from clowder.controller.v1 import resources_pb2
from clowder_common import keys
from clowder_common.etcd import UNFENCED, EtcdState, Fence, PrefixCache
from clowder_common.tasks import cancel_and_wait, run_periodically
from clowder_controller.caches import stop_caches
from clowder_controller.events import EventRecorder

log = logging.getLogger(__name__)

DEFAULT_TARGET = 4.0


@dataclasses.dataclass(frozen=True)
class Load:
    """One deployment's load summed over every balancer."""

    in_flight: int = 0
    waiting: int = 0
    # Wall-clock seconds of the newest request any balancer saw (0: none reported).
    last_request: float = 0.0


@dataclasses.dataclass(frozen=True)
class Windows:
    up_s: float = 0.0
    down_s: float = 30.0


@dataclasses.dataclass
class History:
    """What the autoscaler remembers about one deployment (in memory: a new leader starts afresh, conservatively)."""

    first_seen: float
    recommendations: deque = dataclasses.field(default_factory=deque)


def is_autoscaled(deployment: resources_pb2.Deployment) -> bool:
    return deployment.max_replicas > 0


def sum_loads(reports: list[load_pb2.BalancerLoad]) -> dict[str, Load]:
    totals: dict[str, list] = {}
    for report in reports:
        for name, load in report.deployments.items():
            t = totals.setdefault(name, [0, 0, 0.0])
            t[0] += load.in_flight
            t[1] += load.waiting
            if load.HasField("last_request_time"):
                t[2] = max(t[2], load.last_request_time.ToNanoseconds() / 1e9)
    return {name: Load(*t) for name, t in totals.items()}


def decide(deployment: resources_pb2.Deployment, load: Load, history: History, now: float,
           windows: Windows) -> tuple[int, str]:
    """The replica count to set now and why; `now` is wall-clock seconds."""
    current = deployment.replicas
    target = deployment.target_in_flight or DEFAULT_TARGET
    demand = load.in_flight + load.waiting
    last_active = max(load.last_request, history.first_seen, now if demand else 0.0)
    idle_s = now - last_active
    may_sleep = deployment.min_replicas == 0 and deployment.scale_to_zero_after_s > 0
    if may_sleep and not demand and (current == 0 or idle_s >= deployment.scale_to_zero_after_s):
        # At zero, only a request wakes it (activation); otherwise it goes to sleep once idle long enough.
        history.recommendations.clear()
        return 0, "" if current == 0 else f"idle for {idle_s:.0f}s"
    floor = max(deployment.min_replicas, 1)
    wanted = min(deployment.max_replicas, max(floor, math.ceil(demand / target)))
    history.recommendations.append((now, wanted))
    horizon = now - max(windows.up_s, windows.down_s)
    while history.recommendations and history.recommendations[0][0] < horizon:
        history.recommendations.popleft()
    if current == 0 and load.waiting:
        return wanted, f"activated: {load.waiting} request(s) waiting"
    if wanted > current:
        recent = [r for t, r in history.recommendations if t >= now - windows.up_s] or [wanted]
        return max(current, min(recent)), f"{demand} request(s) for a target of {target:g} per replica"
    if wanted < current:
        recent = [r for t, r in history.recommendations if t >= now - windows.down_s] or [wanted]
        return min(current, max(recent)), f"{demand} request(s) for a target of {target:g} per replica"
    return current, ""


class Autoscaler:
    """Runs on the leader: watches load/ and deployments/, writes Deployment.replicas (compare-and-swap)."""

    def __init__(self, state: EtcdState, events: EventRecorder, interval_s: float, windows: Windows) -> None:
        self._state = state
        self._events = events
        self._interval = interval_s
        self._windows = windows
        self._wake = asyncio.Event()
        self._loads = PrefixCache(state, state.key(keys.LOAD), load_pb2.BalancerLoad, on_change=self._wake.set)
        self._deployments = PrefixCache(state, state.key(keys.DEPLOYMENTS), resources_pb2.Deployment)
        self._history: dict[str, History] = {}
        self._task: asyncio.Task | None = None
        # Set per term by start(): a deposed leader's scaling write fails instead of landing.
        self._fence: Fence = UNFENCED

    async def start(self, fence: Fence = UNFENCED) -> None:
        self._fence = fence
        await self._deployments.start()
        await self._loads.start()
        self._task = asyncio.create_task(
            run_periodically(self.scale_once, self._interval, self._wake, "autoscaling pass"), name="autoscaler")

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None
        await stop_caches([self._loads, self._deployments])
        self._history.clear()
        self._fence = UNFENCED

    async def scale_once(self) -> None:
        if not (self._loads.ready and self._deployments.ready):
            return
        now = time.time()
        loads = sum_loads(self._loads.values())
        seen = set()
        for deployment in self._deployments.values():
            if not is_autoscaled(deployment):
                continue
            seen.add(deployment.name)
            history = self._history.setdefault(deployment.name, History(first_seen=now))
            wanted, why = decide(deployment, loads.get(deployment.name, Load()), history, now, self._windows)
            if wanted != deployment.replicas:
                await self._set_replicas(deployment.name, deployment.replicas, wanted, why)
        for gone in set(self._history) - seen:
            del self._history[gone]

    async def _set_replicas(self, name: str, before: int, wanted: int, why: str) -> None:
        key = self._state.key(keys.deployment(name))
        current = await self._state.get(key, resources_pb2.Deployment)
        if current is None or current.value.replicas != before or not is_autoscaled(current.value):
            return  # changed under us: the next pass decides on the new value
        updated = resources_pb2.Deployment()
        updated.CopyFrom(current.value)
        updated.replicas = wanted
        updated.update_time.GetCurrentTime()
        if await self._state.update(key, updated, current.mod_revision, fence=self._fence):
            self._events.record(name, "scaled", f"replicas {before} -> {wanted}: {why}")
