"""Preemption: on a full cluster, find the lower-priority replicas whose eviction makes room for a replica."""

from __future__ import annotations

import dataclasses
from typing import Sequence

from clowder.controller.v1 import resources_pb2
from clowder_controller.scheduling.framework import NodeInfo, PlacementRequest
from clowder_controller.scheduling.labels import LabelMatch


@dataclasses.dataclass(frozen=True)
class Placed:
    """A replica running on a node, as preemption sees it."""

    replica: resources_pb2.Replica
    request: PlacementRequest
    priority: int


def _fits_without(node: NodeInfo, request: PlacementRequest, victims: Sequence[Placed]) -> bool:
    freed_memory = sum(v.request.memory_bytes for v in victims)
    freed_gpus = sum(v.request.gpus for v in victims)
    memory_ok = (not request.memory_bytes or not node.node.memory_bytes
                 or node.node.memory_bytes - node.allocated_memory + freed_memory >= request.memory_bytes)
    gpus_ok = not request.gpus or node.node.gpus - node.allocated_gpus + freed_gpus >= request.gpus
    return memory_ok and gpus_ok


def pick_victims(request: PlacementRequest, priority: int, nodes: Sequence[NodeInfo],
                 placed: dict[str, list[Placed]]) -> tuple[NodeInfo, list[Placed]] | None:
    """The node needing the fewest evictions (then the lowest-priority ones), or None if evicting cannot help.

    Only replicas of strictly lower priority are candidates, the lowest first, so
    equal priorities never evict each other and nothing flaps.
    """
    labels = LabelMatch()
    best: tuple[tuple[int, int, str], NodeInfo, list[Placed]] | None = None
    for node in labels.filter(request, nodes):
        lower = sorted((p for p in placed.get(node.name, ()) if p.priority < priority),
                       key=lambda p: (p.priority, -p.request.memory_bytes, p.replica.id))
        victims: list[Placed] = []
        for candidate in lower:
            if _fits_without(node, request, victims):
                break
            victims.append(candidate)
        if not victims or not _fits_without(node, request, victims):
            continue
        cost = (len(victims), max(v.priority for v in victims), node.name)
        if best is None or cost < best[0]:
            best = (cost, node, victims)
    return None if best is None else (best[1], best[2])
