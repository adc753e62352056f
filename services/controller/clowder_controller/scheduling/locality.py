"""Scorer: prefer nodes that already hold the model layer, so the replica starts without a pull."""

from __future__ import annotations

from typing import ClassVar, Sequence

from clowder_common.plugins import Plugin
from clowder_controller.scheduling.framework import NodeInfo, PlacementRequest, Scorer


class Locality(Plugin, Scorer):
    TYPE: ClassVar[str] = "locality"

    def score(self, request: PlacementRequest, nodes: Sequence[NodeInfo]) -> dict[str, float]:
        digest = request.digest
        return {n.name: 1.0 if digest and digest in n.digests else 0.0 for n in nodes}
