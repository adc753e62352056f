"""Replica choice: candidates in, one choice out (the seam where filters and scorers plug in later)."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Protocol, Sequence


@dataclass(frozen=True)
class Candidate:
    """A ready replica as the router sees it at the moment of choice."""

    replica_id: str
    address: str
    # Requests this balancer has routed to the replica and not yet finished.
    in_flight: int


class Picker(Protocol):
    def pick(self, candidates: Sequence[Candidate]) -> Candidate:
        """Choose one of `candidates` (never empty)."""
        ...


class LeastInFlightPicker:
    """The replica with the fewest requests in flight from this balancer; ties broken at random.

    Random ties keep several balancers that each see zero load from all piling
    onto the first replica in key order.
    """

    def __init__(self, rng: random.Random | None = None) -> None:
        self._rng = rng or random.Random()

    def pick(self, candidates: Sequence[Candidate]) -> Candidate:
        if not candidates:
            raise ValueError("no candidates to pick from")
        least = min(c.in_flight for c in candidates)
        return self._rng.choice([c for c in candidates if c.in_flight == least])
