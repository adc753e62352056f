"""One routing profile run over the candidates: filters in order, weighted scorers, then the picker."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Sequence

from clowder_balancer.routing.base import Candidate, Filter, RouteRequest, ScoredPicker, Scorer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WeightedScorer:
    scorer: Scorer
    weight: float


class Scheduler:
    def __init__(
        self, name: str, filters: Sequence[Filter], scorers: Sequence[WeightedScorer], picker: ScoredPicker
    ) -> None:
        self.name = name
        self.filters = list(filters)
        self.scorers = list(scorers)
        self.picker = picker

    @property
    def uses_blocks(self) -> bool:
        """Whether some plugin looks at the prompt's block hashes (computing them is work)."""
        return any(getattr(p, "uses_blocks", False) for p in self.plugins())

    def plugins(self) -> list[object]:
        return [*self.filters, *(w.scorer for w in self.scorers), self.picker]

    def schedule(self, request: RouteRequest, candidates: Sequence[Candidate]) -> Candidate:
        """The chosen candidate. Soft filters that would leave nothing are skipped; hard ones raise."""
        if not candidates:
            raise ValueError("no candidates to schedule")
        remaining = list(candidates)
        for f in self.filters:
            kept = f.filter(request, remaining)
            if kept:
                remaining = kept
            elif f.hard:
                raise ValueError(f"hard filter {f.name} left no candidate")
        totals = {c.address: 0.0 for c in remaining}
        for weighted in self.scorers:
            if weighted.weight == 0:
                continue
            scores = weighted.scorer.score(request, remaining)
            for address in totals:
                totals[address] += weighted.weight * min(1.0, max(0.0, scores.get(address, 0.0)))
        return self.picker.pick_scored([(c, totals[c.address]) for c in remaining])

    def routed(self, request: RouteRequest, chosen: Candidate) -> None:
        for plugin in self.plugins():
            hook = getattr(plugin, "routed", None)
            if hook is not None:
                hook(request, chosen)

    def prefilled(self, request: RouteRequest, chosen: Candidate) -> None:
        """Once per routed(): the attempt had its first message, or ended without one."""
        for plugin in self.plugins():
            hook = getattr(plugin, "prefilled", None)
            if hook is not None:
                hook(request, chosen)

    def finished(self, request: RouteRequest, chosen: Candidate, blocks: tuple[int, ...]) -> None:
        for plugin in self.plugins():
            hook = getattr(plugin, "finished", None)
            if hook is not None:
                hook(request, chosen, blocks)

    def runtime_report(self, address: str, stats: object) -> None:
        for plugin in self.plugins():
            hook = getattr(plugin, "runtime_report", None)
            if hook is not None:
                hook(address, stats)

    def forget(self, address: str) -> None:
        for plugin in self.plugins():
            hook = getattr(plugin, "forget", None)
            if hook is not None:
                hook(address)
