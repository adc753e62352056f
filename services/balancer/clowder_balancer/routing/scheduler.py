"""One routing profile run over the candidates: filters in order, weighted scorers, then the picker."""

from __future__ import annotations

import logging
from typing import Any, Sequence

from clowder_common.plugins import Instance, weighted_sum

from clowder_balancer.routing.base import (
    BlockReader, Candidate, Filter, Observer, Picker, RouteRequest, Scorer, StatsConsumer,
)

log = logging.getLogger(__name__)


class Scheduler:
    def __init__(self, name: str, filters: Sequence[Instance[Filter]], scorers: Sequence[Instance[Scorer]],
                 picker: Instance[Picker]) -> None:
        self.name = name
        self.filters = list(filters)
        self.scorers = list(scorers)
        self.picker = picker
        # Each hook's plugins, found once by their declared interface (the registry refused partial ones).
        plugins = self.plugins()
        self._observers = [p for p in plugins if isinstance(p, Observer)]
        self._stats = [p for p in plugins if isinstance(p, StatsConsumer)]
        self.uses_blocks = any(isinstance(p, BlockReader) for p in plugins)

    def plugins(self) -> list[object]:
        """Every plugin of the profile in order: filters, scorers, the picker."""
        return [*(i.plugin for i in self.filters), *(i.plugin for i in self.scorers), self.picker.plugin]

    def schedule(self, request: RouteRequest, candidates: Sequence[Candidate]) -> Candidate:
        """The chosen candidate. Soft filters that would leave nothing are skipped; hard ones raise."""
        if not candidates:
            raise ValueError("no candidates to schedule")
        remaining = list(candidates)
        for f in self.filters:
            kept = f.plugin.filter(request, remaining)
            if kept:
                remaining = kept
            elif f.plugin.hard:
                raise ValueError(f"hard filter {f.name} left no candidate")
        totals = weighted_sum([c.address for c in remaining],
                              ((s.weight, s.plugin.score(request, remaining)) for s in self.scorers if s.weight))
        return self.picker.plugin.pick([(c, totals[c.address]) for c in remaining])

    def routed(self, request: RouteRequest, chosen: Candidate) -> None:
        for observer in self._observers:
            observer.routed(request, chosen)

    def prefilled(self, request: RouteRequest, chosen: Candidate) -> None:
        """Once per routed(): the attempt had its first message, or ended without one."""
        for observer in self._observers:
            observer.prefilled(request, chosen)

    def finished(self, request: RouteRequest, chosen: Candidate, blocks: tuple[int, ...]) -> None:
        for observer in self._observers:
            observer.finished(request, chosen, blocks)

    def runtime_report(self, address: str, stats: Any) -> None:
        for consumer in self._stats:
            consumer.runtime_report(address, stats)

    def forget(self, address: str) -> None:
        for observer in self._observers:
            observer.forget(address)
