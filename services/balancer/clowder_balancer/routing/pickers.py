"""Pickers: the highest weighted score (ties at random), round-robin, random, least in flight."""

from __future__ import annotations

import itertools
import random
from typing import Any, ClassVar, Mapping, Self, Sequence

from clowder_common.plugins import Plugin, parse_params

from clowder_balancer.routing.base import Candidate, Picker, RoutingEnv

# Scores closer than this count as a tie: float sums of weights must not decide between equals.
TIE_EPSILON = 1e-9


def _require(scored: Sequence[tuple[Candidate, float]]) -> None:
    if not scored:
        raise ValueError("no candidates to pick from")


class _RandomTies(Plugin):
    """A picker that draws among equals with the profile's random source (a seeded one in tests)."""

    @classmethod
    def create(cls, params: Mapping[str, Any], env: RoutingEnv) -> Self:
        parse_params(cls.Params, params)
        return cls(env.rng)

    def __init__(self, rng: random.Random | None = None) -> None:
        self._rng = rng or random.Random()


class MaxScorePicker(_RandomTies, Picker):
    """The highest score; random ties keep several balancers that each see the same scores from piling onto one
    replica."""

    TYPE: ClassVar[str] = "max-score"

    def pick(self, scored: Sequence[tuple[Candidate, float]]) -> Candidate:
        _require(scored)
        best = max(score for _, score in scored)
        return self._rng.choice([c for c, score in scored if score >= best - TIE_EPSILON])


class RoundRobinPicker(Plugin, Picker):
    TYPE: ClassVar[str] = "round-robin"

    def __init__(self) -> None:
        self._counter = itertools.count()

    def pick(self, scored: Sequence[tuple[Candidate, float]]) -> Candidate:
        _require(scored)
        ordered = sorted((c for c, _ in scored), key=lambda c: c.replica_id)
        return ordered[next(self._counter) % len(ordered)]


class RandomPicker(_RandomTies, Picker):
    TYPE: ClassVar[str] = "random"

    def pick(self, scored: Sequence[tuple[Candidate, float]]) -> Candidate:
        _require(scored)
        return self._rng.choice([c for c, _ in scored])


class LeastInFlightPicker(_RandomTies, Picker):
    """The replica with the fewest requests in flight from this balancer; ties broken at random.

    Random ties keep several balancers that each see zero load from all piling
    onto the first replica in key order.
    """

    TYPE: ClassVar[str] = "least-in-flight"

    def pick(self, scored: Sequence[tuple[Candidate, float]]) -> Candidate:
        _require(scored)
        least = min(c.in_flight for c, _ in scored)
        return self._rng.choice([c for c, _ in scored if c.in_flight == least])
