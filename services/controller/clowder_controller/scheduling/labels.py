"""Filter: the node's labels must include every pair of the deployment's node selector."""

from __future__ import annotations

from typing import ClassVar, Sequence

from clowder_common.plugins import Plugin
from clowder_controller.scheduling.framework import Filter, NodeInfo, PlacementRequest


class LabelMatch(Plugin, Filter):
    TYPE: ClassVar[str] = "labels"

    def filter(self, request: PlacementRequest, nodes: Sequence[NodeInfo]) -> list[NodeInfo]:
        if not request.node_selector:
            return list(nodes)
        wanted = request.node_selector.items()
        return [n for n in nodes if wanted <= n.node.labels.items()]

    def reason(self, request: PlacementRequest, rejected: int) -> str:
        selector = ",".join(f"{k}={v}" for k, v in sorted(request.node_selector.items()))
        return f"{rejected} without labels {selector}"
