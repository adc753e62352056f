"""Scorers for how full nodes get: spread (emptiest first) or bin-pack (fullest that fits first).

Fullness is ranked relative to the other candidates (min-max over the list), so
one replica more or less still counts on a cluster of big nodes, and the
locality preference cannot pile every replica onto the nodes holding a model.
"""

from __future__ import annotations

from typing import ClassVar, Sequence

from clowder_common.plugins import Plugin
from clowder_controller.scheduling.framework import NodeInfo, PlacementRequest, Scorer


def _used(node: NodeInfo, request: PlacementRequest) -> float:
    """Memory fraction in use after placing the replica; the replica count stands in when memory is unknown."""
    total = node.node.memory_bytes
    if total:
        return (node.allocated_memory + request.memory_bytes) / total
    return float(node.replicas + 1)


def _relative(values: list[float]) -> list[float]:
    """0 for the least used candidate, 1 for the most used."""
    lo, hi = min(values), max(values)
    if hi <= lo:
        return [0.0] * len(values)
    span = hi - lo
    return [(v - lo) / span for v in values]


class Spread(Plugin, Scorer):
    """Prefer nodes without a replica of this deployment, then the least used ones."""

    TYPE: ClassVar[str] = "spread"

    def score(self, request: PlacementRequest, nodes: Sequence[NodeInfo]) -> dict[str, float]:
        dep = request.deployment
        fullness = _relative([_used(n, request) for n in nodes])
        return {n.name: 0.5 / (1 + n.per_deployment.get(dep, 0)) + 0.5 * (1.0 - f) for n, f in zip(nodes, fullness)}


class BinPack(Plugin, Scorer):
    """Prefer the fullest node that still fits, leaving whole nodes free for big models."""

    TYPE: ClassVar[str] = "binpack"

    def score(self, request: PlacementRequest, nodes: Sequence[NodeInfo]) -> dict[str, float]:
        return {n.name: f for n, f in zip(nodes, _relative([_used(n, request) for n in nodes]))}
