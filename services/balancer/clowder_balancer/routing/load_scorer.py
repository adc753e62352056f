"""Least load: 1 for an idle replica, falling linearly to 0 at the saturation point (in-flight plus queue)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Sequence

from clowder_common.plugins import Plugin, param

from clowder_balancer.routing.base import Candidate, RouteRequest, Scorer

# Load (requests in flight plus queued) at which a replica counts as full, when a profile does not say
# (this scorer's and the not-saturated filter's).
DEFAULT_SATURATION = 4


class LoadScorer(Plugin, Scorer):
    TYPE: ClassVar[str] = "load"

    @dataclass(frozen=True)
    class Params:
        saturation: int = param(DEFAULT_SATURATION, min=1)

    def __init__(self, saturation: int = DEFAULT_SATURATION) -> None:
        # An absolute scale rather than min/max over the candidates: one request more must not flip a
        # replica from best to worst, or load would drown every other scorer at low traffic.
        self.saturation = max(1, int(saturation))

    def score(self, request: RouteRequest, candidates: Sequence[Candidate]) -> dict[str, float]:
        return {c.address: 1.0 - min(c.load, self.saturation) / self.saturation for c in candidates}
