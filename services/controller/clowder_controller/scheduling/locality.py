"""Scorer: prefer nodes that already hold the model layer, so the replica starts without a pull."""

from __future__ import annotations

from typing import Sequence

from clowder_controller.scheduling.framework import NodeInfo, PlacementRequest


class Locality:
    name = "locality"

    def score(self, request: PlacementRequest, nodes: Sequence[NodeInfo]) -> list[float]:
        digest = request.digest
        if not digest:
            return [0.0] * len(nodes)
        return [1.0 if digest in n.digests else 0.0 for n in nodes]
