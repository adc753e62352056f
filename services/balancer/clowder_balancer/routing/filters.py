"""Filters: ready (reachable), not ejected, not saturated, has the requested adapter."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Sequence

from clowder_common.errors import Unavailable
from clowder_common.plugins import Plugin, param

from clowder_balancer.routing.base import Candidate, Filter, RouteRequest
from clowder_balancer.routing.load_scorer import DEFAULT_SATURATION


class ReadyFilter(Plugin, Filter):
    """Drops replicas whose stats polls keep failing (a registered endpoint whose process is gone)."""

    TYPE: ClassVar[str] = "ready"
    hard = False

    def filter(self, request: RouteRequest, candidates: Sequence[Candidate]) -> list[Candidate]:
        return [c for c in candidates if c.reachable]


class NotEjectedFilter(Plugin, Filter):
    """Drops replicas outlier detection has ejected."""

    TYPE: ClassVar[str] = "not-ejected"
    hard = False

    def filter(self, request: RouteRequest, candidates: Sequence[Candidate]) -> list[Candidate]:
        return [c for c in candidates if not c.ejected]


class SaturationFilter(Plugin, Filter):
    """Drops replicas at or past `saturation` load, so affinity yields to load instead of making hotspots."""

    TYPE: ClassVar[str] = "not-saturated"
    hard = False

    @dataclass(frozen=True)
    class Params:
        saturation: int = param(DEFAULT_SATURATION, min=1)

    def __init__(self, saturation: int = DEFAULT_SATURATION) -> None:
        self.saturation = max(1, int(saturation))

    def filter(self, request: RouteRequest, candidates: Sequence[Candidate]) -> list[Candidate]:
        return [c for c in candidates if c.load < self.saturation]


class AdapterFilter(Plugin, Filter):
    """Keeps replicas that have the requested adapter; a request for the base model keeps all."""

    TYPE: ClassVar[str] = "adapter"
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
