"""LeastInFlightPicker: the fewest in-flight requests wins, ties are broken at random."""

from __future__ import annotations

import random

import pytest

from clowder_balancer.routing.base import Candidate
from clowder_balancer.routing.pickers import LeastInFlightPicker

pytestmark = pytest.mark.unit


def _candidates(loads: list[int]) -> list[tuple[Candidate, float]]:
    """Scored as a profile without scorers passes them (every score 0)."""
    return [(Candidate(f"r{i}", f"127.0.0.1:{5000 + i}", load), 0.0) for i, load in enumerate(loads)]


@pytest.mark.parametrize(
    ("loads", "allowed"),
    [
        ([0], {"r0"}),
        ([3, 0], {"r1"}),
        ([0, 3], {"r0"}),
        ([2, 1, 5], {"r1"}),
        ([4, 4, 1, 9], {"r2"}),
        ([0, 0], {"r0", "r1"}),
        ([1, 0, 0, 1], {"r1", "r2"}),
        ([7, 7, 7], {"r0", "r1", "r2"}),
    ],
)
def test_picks_among_least_loaded(loads: list[int], allowed: set[str]) -> None:
    picker = LeastInFlightPicker(random.Random(0))
    seen = {picker.pick(_candidates(loads)).replica_id for _ in range(200)}
    # Every tie gets chosen (the rng is seeded: 200 draws over <= 3 ties cannot miss one) and nothing else is.
    assert seen == allowed


def test_empty_candidates_is_an_error() -> None:
    with pytest.raises(ValueError):
        LeastInFlightPicker().pick([])
