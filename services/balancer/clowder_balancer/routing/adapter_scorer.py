"""Adapter affinity: prefer a replica that already has the requested LoRA adapter loaded."""

from __future__ import annotations

from typing import ClassVar, Sequence

from clowder_common.plugins import Plugin

from clowder_balancer.routing.base import Candidate, RouteRequest, Scorer


class AdapterScorer(Plugin, Scorer):
    TYPE: ClassVar[str] = "adapter"

    def score(self, request: RouteRequest, candidates: Sequence[Candidate]) -> dict[str, float]:
        if not request.adapter:
            return {c.address: 0.0 for c in candidates}
        return {c.address: 1.0 if request.adapter in c.adapters else 0.0 for c in candidates}
