"""Filter: a replica that needs GPUs only goes where enough of them are left."""

from __future__ import annotations

from typing import ClassVar, Sequence

from clowder_common.plugins import Plugin
from clowder_controller.scheduling.framework import Filter, NodeInfo, PlacementRequest


class GpuFit(Plugin, Filter):
    TYPE: ClassVar[str] = "gpus"

    def filter(self, request: PlacementRequest, nodes: Sequence[NodeInfo]) -> list[NodeInfo]:
        if not request.gpus:
            return list(nodes)
        return [n for n in nodes if n.node.gpus - n.allocated_gpus >= request.gpus]

    def reason(self, request: PlacementRequest, rejected: int) -> str:
        return f"{rejected} without {request.gpus} free GPU(s)"
