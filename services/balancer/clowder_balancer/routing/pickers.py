"""Pickers: the highest weighted score (ties at random), round-robin, random, least in flight."""

from __future__ import annotations

import itertools
import random
from typing import Sequence

from clowder_balancer.routing.base import Candidate

# Scores closer than this count as a tie: float sums of weights must not decide between equals.
TIE_EPSILON = 1e-9


class MaxScorePicker:
    name = "max-score"

    def __init__(self, rng: random.Random | None = None) -> None:
        # Random ties keep several balancers that each see the same scores from piling onto one replica.
        self._rng = rng or random.Random()

    def pick_scored(self, scored: Sequence[tuple[Candidate, float]]) -> Candidate:
        if not scored:
            raise ValueError("no candidates to pick from")
        best = max(score for _, score in scored)
        return self._rng.choice([c for c, score in scored if score >= best - TIE_EPSILON])


class RoundRobinPicker:
    name = "round-robin"

    def __init__(self) -> None:
        self._counter = itertools.count()

    def pick_scored(self, scored: Sequence[tuple[Candidate, float]]) -> Candidate:
        if not scored:
            raise ValueError("no candidates to pick from")
        ordered = sorted((c for c, _ in scored), key=lambda c: c.replica_id)
        return ordered[next(self._counter) % len(ordered)]


class RandomPicker:
    name = "random"

    def __init__(self, rng: random.Random | None = None) -> None:
        self._rng = rng or random.Random()

    def pick_scored(self, scored: Sequence[tuple[Candidate, float]]) -> Candidate:
        if not scored:
            raise ValueError("no candidates to pick from")
        return self._rng.choice([c for c, _ in scored])


class LeastInFlightPicker:
    """The replica with the fewest requests in flight from this balancer; ties broken at random.

    Random ties keep several balancers that each see zero load from all piling
    onto the first replica in key order.
    """

    name = "least-in-flight"

    def __init__(self, rng: random.Random | None = None) -> None:
        self._rng = rng or random.Random()

    def pick(self, candidates: Sequence[Candidate]) -> Candidate:
        if not candidates:
            raise ValueError("no candidates to pick from")
        least = min(c.in_flight for c in candidates)
        return self._rng.choice([c for c in candidates if c.in_flight == least])

    def pick_scored(self, scored: Sequence[tuple[Candidate, float]]) -> Candidate:
        return self.pick([c for c, _ in scored])
