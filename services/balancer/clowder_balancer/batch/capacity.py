"""Free slots of a deployment's replicas, as batch work sees them: interactive requests always come first."""

from __future__ import annotations

from clowder_balancer.discovery import Discovery
from clowder_balancer.router import Router

# Slots assumed for a replica whose GetStats has not answered yet (runtimes default to 8; be modest).
UNKNOWN_SLOTS = 2


class Capacity:
    """Batch invocations of a model may start while this says slots are free.

    A slot is busy when the runtime reports a request running or waiting in it (every balancer's, polled), or
    when this balancer has a request in flight there (seen at once, before the next poll). `reserve` slots
    per deployment stay free for interactive requests, and a deployment with requests waiting in a queue
    takes no batch work at all. A deployment without a ready replica takes one invocation: it waits in the
    router like an interactive request, which is what wakes a deployment scaled to zero.
    """

    def __init__(self, discovery: Discovery, router: Router, reserve: int) -> None:
        self._discovery = discovery
        self._router = router
        self._reserve = reserve

    def free(self, model: str, batch_in_flight: int, recently_done: int = 0) -> int:
        """Invocations of `model` that may start now. `recently_done`: batch invocations that ended within the
        last poll interval or two, which the polled figures may still count as running."""
        if not self._discovery.has_model(model):
            # Unknown model: the pipeline answers 404 at once; nothing to protect.
            return 1
        endpoints = self._discovery.endpoints(model)
        if not endpoints:
            return 1 if batch_in_flight == 0 else 0
        slots = polled = local = 0
        for endpoint in endpoints:
            stats = self._router.stats.get(endpoint.address)
            if not stats.reachable:
                continue
            if stats.waiting:
                return 0
            slots += getattr(stats, "slots", 0) or UNKNOWN_SLOTS
            polled += stats.running
            local += self._router.in_flight(endpoint.address)
        # Polled figures lag by up to one poll: a slot a batch line just left would look busy for that long
        # (a throughput loss at every turnover), so lines known to have ended since are taken off them.
        busy = max(polled - recently_done, local, batch_in_flight)
        # A replica of one slot still takes batch work when idle: the reserve never shuts batches out.
        return max(1, slots - self._reserve) - busy
