"""Decode-step figures for /metrics: how many tokens each llama_decode held, and how long it took.

How full the batch runs is what slots and threads are tuned by (vLLM's iteration-tokens histogram answers the
same question); the engine's other figures count requests and tokens, not steps.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

# Powers of two up to the default prompt chunk (a step holds at most one chunk).
TOKEN_BOUNDS: tuple[float, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
SECOND_BOUNDS: tuple[float, ...] = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


@dataclass(frozen=True)
class HistogramSnapshot:
    bounds: tuple[float, ...]
    # Observations per bucket (not cumulative); one more than bounds: the last is above every bound.
    counts: tuple[int, ...]
    total: float

    def cumulative(self) -> list[tuple[float, int]]:
        """(upper bound, observations at or below it) as Prometheus lists buckets, infinity last."""
        out, running = [], 0
        for bound, count in zip((*self.bounds, float("inf")), self.counts):
            running += count
            out.append((bound, running))
        return out


class StepHistogram:
    """Kept by the decode thread alone (a bisection and two additions a step); read as a snapshot."""

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self._bounds = bounds
        self._counts = [0] * (len(bounds) + 1)
        self._total = 0.0

    def observe(self, value: float) -> None:
        self._counts[bisect.bisect_left(self._bounds, value)] += 1
        self._total += value

    def snapshot(self) -> HistogramSnapshot:
        return HistogramSnapshot(self._bounds, tuple(self._counts), self._total)
