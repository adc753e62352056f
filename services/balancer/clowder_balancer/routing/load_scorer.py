"""Least load: 1 for an idle replica, falling linearly to 0 at the saturation point (in-flight plus queue)."""

from __future__ import annotations

from typing import Sequence

from clowder_balancer.routing.base import Candidate, RouteRequest

DEFAULT_SATURATION = 8


class LoadScorer:
    name = "load"

    def __init__(self, saturation: int = DEFAULT_SATURATION) -> None:
        # An absolute scale rather than min/max over the candidates: one request more must not flip a
        # replica from best to worst, or load would drown every other scorer at low traffic.
        self.saturation = max(1, int(saturation))

    def score(self, request: RouteRequest, candidates: Sequence[Candidate]) -> dict[str, float]:
        return {c.address: 1.0 - min(c.load, self.saturation) / self.saturation for c in candidates}
