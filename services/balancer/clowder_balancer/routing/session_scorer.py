"""Session affinity: requests carrying the same session key go back to the replica that served the last one."""

from __future__ import annotations

import collections
from dataclasses import dataclass
from typing import ClassVar, Sequence

from clowder_common.plugins import Plugin, param

from clowder_balancer.routing.base import Candidate, Observer, RouteRequest, Scorer

DEFAULT_CAPACITY = 100_000


class SessionScorer(Plugin, Scorer, Observer):
    TYPE: ClassVar[str] = "session"

    @dataclass(frozen=True)
    class Params:
        # Sessions remembered (least recently used forgotten first).
        capacity: int = param(DEFAULT_CAPACITY, min=1)

    def __init__(self, capacity: int = DEFAULT_CAPACITY) -> None:
        self._capacity = max(1, capacity)
        # session -> address; bounded because session keys come from clients.
        self._last: collections.OrderedDict[str, str] = collections.OrderedDict()

    def score(self, request: RouteRequest, candidates: Sequence[Candidate]) -> dict[str, float]:
        home = self._last.get(request.session) if request.session else None
        return {c.address: 1.0 if c.address == home else 0.0 for c in candidates}

    def routed(self, request: RouteRequest, chosen: Candidate) -> None:
        if not request.session:
            return
        self._last[request.session] = chosen.address
        self._last.move_to_end(request.session)
        while len(self._last) > self._capacity:
            self._last.popitem(last=False)

    def prefilled(self, request: RouteRequest, chosen: Candidate) -> None:
        pass  # the session's home is where it was routed, whatever came of the attempt

    def finished(self, request: RouteRequest, chosen: Candidate, blocks: tuple[int, ...]) -> None:
        pass

    def forget(self, address: str) -> None:
        for session in [s for s, a in self._last.items() if a == address]:
            del self._last[session]
