"""Fair admission per model: a bounded queue by priority class, tenants taking turns, when replicas are saturated."""

from __future__ import annotations

import asyncio
import collections
import time
from dataclasses import dataclass, field
from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from clowder.balancer.v1 import apikeys_pb2
from clowder_common.errors import ResourceExhausted, Unavailable

CLASSES: dict[int, str] = {
    apikeys_pb2.PRIORITY_CLASS_CRITICAL: "critical",
    apikeys_pb2.PRIORITY_CLASS_STANDARD: "standard",
    apikeys_pb2.PRIORITY_CLASS_SHEDDABLE: "sheddable",
}
# Queue order: lower first.
_RANK: dict[int, int] = {apikeys_pb2.PRIORITY_CLASS_CRITICAL: 0, apikeys_pb2.PRIORITY_CLASS_STANDARD: 1,
         apikeys_pb2.PRIORITY_CLASS_SHEDDABLE: 2}
WAIT_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


@dataclass(eq=False)
class _Waiter:
    tenant: str
    rank: int
    granted: asyncio.Future
    # Set when a higher class took this request's place in a full queue.
    shed: bool = False


@dataclass
class _Class:
    """One priority class of one model: a FIFO per tenant, and the tenants' turn order."""

    queues: dict[str, collections.deque[_Waiter]] = field(default_factory=dict)
    turns: collections.deque[str] = field(default_factory=collections.deque)

    def push(self, waiter: _Waiter) -> None:
        queue = self.queues.get(waiter.tenant)
        if queue is None:
            queue = self.queues[waiter.tenant] = collections.deque()
            self.turns.append(waiter.tenant)
        queue.append(waiter)

    def pop(self, allowed: Callable[[str], bool]) -> _Waiter | None:
        """The next tenant's oldest request, skipping tenants not `allowed` a slot now."""
        for _ in range(len(self.turns)):
            tenant = self.turns[0]
            if not allowed(tenant):
                self.turns.rotate(-1)
                continue
            self.turns.popleft()
            queue = self.queues[tenant]
            waiter = queue.popleft()
            if queue:
                self.turns.append(tenant)
            else:
                del self.queues[tenant]
            return waiter
        return None

    def remove(self, waiter: _Waiter) -> None:
        queue = self.queues.get(waiter.tenant)
        if queue is None or waiter not in queue:
            return
        queue.remove(waiter)
        if not queue:
            del self.queues[waiter.tenant]
            self.turns.remove(waiter.tenant)

    def newest(self) -> _Waiter | None:
        """The last request of the tenant with the most waiting (the one to shed first)."""
        if not self.queues:
            return None
        return max(self.queues.values(), key=len)[-1]

    def __len__(self) -> int:
        return sum(len(q) for q in self.queues.values())


@dataclass
class _Model:
    running: int = 0
    waiting: int = 0
    classes: dict[int, _Class] = field(default_factory=lambda: {rank: _Class() for rank in range(3)})
    # Requests running per tenant, and when each tenant last arrived or finished (monotonic).
    by_tenant: collections.Counter[str] = field(default_factory=collections.Counter)
    seen: dict[str, float] = field(default_factory=dict)
    # A later dispatch, for when slots kept for idle tenants stop being kept.
    timer: asyncio.TimerHandle | None = None

    def queued(self, tenant: str) -> bool:
        return any(tenant in c.queues for c in self.classes.values())


class FairQueue:
    """Slots per model, granted in priority then round-robin order. `capacity(model)` is the model's slots
    now (0: unknown, no limit).

    Fair admission per model: when the model's replicas are saturated, requests wait in a bounded queue;
    higher priority classes go first, and within a class the keys take turns (round robin), so one tenant's
    burst cannot starve another.

    Saturated means this balancer already runs as many requests of the model as its ready replicas have slots
    (from their GetStats). A light tenant must not wait for a flooder's request to finish either: a tenant
    seen in the last idle_window_s that has nothing running or queued keeps one slot free for its next request
    (at most capacity - 1 slots are kept so, and only while others want them), so a victim's request usually
    finds a free slot rather than the flooder's backlog. A tenant alone uses every slot. Replicas whose slots
    are not known yet (no stats) do not limit anything: the queue only forms once capacity is known. Each
    balancer keeps its own queue over its own requests; with several balancers each may fill the replicas'
    slots, and the runtimes queue the excess in arrival order.
    """

    def __init__(self, capacity: Callable[[str], int], registry: CollectorRegistry, max_queue: int = 256,
                 timeout_s: float = 60.0, idle_window_s: float = 10.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._capacity = capacity
        self._idle_window = idle_window_s
        self._clock = clock
        self._max = max_queue
        self._timeout = timeout_s
        self._models: dict[str, _Model] = {}
        self._depth = Gauge("clowder_balancer_queue_depth",
                            "Requests waiting for a saturated model's slot, by priority class.",
                            ["model", "priority"], registry=registry)
        self._wait = Histogram("clowder_balancer_queue_wait_seconds",
                               "Time requests waited in the fair queue before running (0 when not queued).",
                               ["model", "priority"], buckets=WAIT_BUCKETS, registry=registry)
        self._shed = Counter("clowder_balancer_queue_shed", "Requests refused because the queue was full.",
                           ["model", "priority"], registry=registry)

    def depth(self, model: str) -> int:
        found = self._models.get(model)
        return found.waiting if found else 0

    async def acquire(self, model: str, tenant: str, priority: int) -> None:
        """Take one of the model's slots; waits (bounded) in the queue when the replicas are saturated.
        Every acquire that returns must be paired with one release(model)."""
        state = self._models.setdefault(model, _Model())
        rank = _RANK.get(priority, 1)
        label = CLASSES.get(priority, "standard")
        started = time.monotonic()
        state.seen[tenant] = self._clock()
        capacity = self._capacity(model)
        # A free slot while others wait is one kept for tenants with nothing running: such a tenant takes it.
        light = not state.by_tenant.get(tenant) and not state.queued(tenant)
        if capacity <= 0 or (state.running < capacity and light) or (
                state.waiting == 0 and self._may_run(state, tenant, capacity)):
            self._grant(state, tenant)
        else:
            await self._wait_turn(model, state, tenant, rank, label)
        self._wait.labels(model, label).observe(time.monotonic() - started)

    def release(self, model: str, tenant: str) -> None:
        state = self._models[model]
        state.running -= 1
        state.by_tenant[tenant] -= 1
        if state.by_tenant[tenant] <= 0:
            del state.by_tenant[tenant]
        state.seen[tenant] = self._clock()
        self._dispatch(model, state)

    @staticmethod
    def _grant(state: _Model, tenant: str) -> None:
        state.running += 1
        state.by_tenant[tenant] += 1

    def _kept(self, state: _Model, tenant: str, capacity: int) -> int:
        """Slots kept free for other tenants seen lately that have nothing running or queued."""
        horizon = self._clock() - self._idle_window
        idle = sum(1 for other, at in state.seen.items()
                   if other != tenant and at >= horizon and not state.by_tenant.get(other) and not state.queued(other))
        return min(idle, capacity - 1)

    def _may_run(self, state: _Model, tenant: str, capacity: int) -> bool:
        return capacity <= 0 or state.running < capacity - self._kept(state, tenant, capacity)

    async def _wait_turn(self, model: str, state: _Model, tenant: str, rank: int, label: str) -> None:
        if state.waiting >= self._max:
            victim = self._lowest_below(state, rank)
            if victim is None:
                self._shed.labels(model, label).inc()
                raise ResourceExhausted(f"model '{model}' is saturated and its queue is full",
                                        reason="QUEUE_FULL", retry_after=1.0)
            # A higher class takes the place of the lowest class's latest arrival.
            state.classes[victim.rank].remove(victim)
            state.waiting -= 1
            victim.shed = True
            victim.granted.cancel()
        waiter = _Waiter(tenant, rank, asyncio.get_running_loop().create_future())
        state.classes[rank].push(waiter)
        state.waiting += 1
        self._depth.labels(model, label).inc()
        # Others may be queued behind a slot kept for this tenant: now it is here, it may take it.
        self._dispatch(model, state)
        try:
            await asyncio.wait_for(asyncio.shield(waiter.granted), self._timeout)
        except asyncio.CancelledError:
            if waiter.shed:
                self._shed.labels(model, label).inc()
                raise ResourceExhausted(f"model '{model}' is saturated and its queue is full",
                                        reason="QUEUE_FULL", retry_after=1.0) from None
            self._give_up(model, state, waiter)
            raise
        except asyncio.TimeoutError:
            self._give_up(model, state, waiter)
            raise Unavailable(f"model '{model}' stayed saturated for {self._timeout:g}s", retry_after=1.0) from None
        finally:
            self._depth.labels(model, label).dec()

    def _give_up(self, model: str, state: _Model, waiter: _Waiter) -> None:
        if waiter.granted.done() and not waiter.granted.cancelled():
            # Granted just as we left: pass the slot on.
            self.release(model, waiter.tenant)
            return
        state.classes[waiter.rank].remove(waiter)
        state.waiting -= 1
        waiter.granted.cancel()

    @staticmethod
    def _lowest_below(state: _Model, rank: int) -> _Waiter | None:
        for lower in (2, 1):
            if lower > rank and state.classes[lower]:
                return state.classes[lower].newest()
        return None

    def _dispatch(self, model: str, state: _Model) -> None:
        capacity = self._capacity(model)
        self._forget_idle(state)

        def allowed(tenant: str) -> bool:
            return self._may_run(state, tenant, capacity)

        while state.waiting and (capacity <= 0 or state.running < capacity):
            waiter = next((w for w in (state.classes[r].pop(allowed) for r in range(3)) if w is not None), None)
            if waiter is None:
                # Free slots are kept for idle tenants: look again when the first of them stops counting.
                idle = [at for t, at in state.seen.items() if not state.by_tenant.get(t) and not state.queued(t)]
                if state.timer is None and idle:
                    wake = min(idle) + self._idle_window - self._clock() + 0.01
                    state.timer = asyncio.get_running_loop().call_later(max(0.01, wake), self._redispatch, model)
                break
            state.waiting -= 1
            self._grant(state, waiter.tenant)
            waiter.granted.set_result(None)

    def _redispatch(self, model: str) -> None:
        state = self._models[model]
        state.timer = None
        self._dispatch(model, state)

    def _forget_idle(self, state: _Model) -> None:
        horizon = self._clock() - self._idle_window
        for tenant in [t for t, at in state.seen.items() if at < horizon and not state.by_tenant.get(t)]:
            del state.seen[tenant]
