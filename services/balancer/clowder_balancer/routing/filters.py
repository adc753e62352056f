"""Filters: ready (reachable), not ejected, not saturated, has the requested adapter."""

from __future__ import annotations

from typing import Sequence

from clowder_common.errors import Unavailable

from clowder_balancer.routing.base import Candidate, RouteRequest


class ReadyFilter:
    """Drops replicas whose stats polls keep failing (a registered endpoint whose process is gone)."""

    name = "ready"
    hard = False

    def filter(self, request: RouteRequest, candidates: Sequence[Candidate]) -> list[Candidate]:
        return [c for c in candidates if c.reachable]


class NotEjectedFilter:
    """Drops replicas outlier detection has ejected."""

    name = "not-ejected"
    hard = False

    def filter(self, request: RouteRequest, candidates: Sequence[Candidate]) -> list[Candidate]:
        return [c for c in candidates if not c.ejected]


class SaturationFilter:
    """Drops replicas at or past `saturation` load, so affinity yields to load instead of making hotspots."""

    name = "not-saturated"
    hard = False

    def __init__(self, saturation: int = 8) -> None:
        self.saturation = max(1, int(saturation))

    def filter(self, request: RouteRequest, candidates: Sequence[Candidate]) -> list[Candidate]:
        return [c for c in candidates if c.load < self.saturation]


class AdapterFilter:
    """Keeps replicas that have the requested adapter; a request for the base model keeps all."""

    name = "adapter"
    hard = True

    def filter(self, request: RouteRequest, candidates: Sequence[Candidate]) -> list[Candidate]:
        if not request.adapter:
            return list(candidates)
        kept = [c for c in candidates if request.adapter in c.adapters]
        if not kept:
            raise Unavailable(
                f"no ready replica of model '{request.model}' has adapter '{request.adapter}'",
                reason="NO_REPLICA_WITH_ADAPTER", metadata={"model": request.model, "adapter": request.adapter},
                retry_after=5.0,
            )
        return kept
