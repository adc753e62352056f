"""The scheduler: run the filters, then the weighted scorers, and pick the best node (ties by name)."""

from __future__ import annotations

import dataclasses
import time
from abc import abstractmethod
from typing import Mapping, Protocol, Sequence, runtime_checkable

from clowder.controller.v1 import resources_pb2
from clowder_common.plugins import Instance, weighted_sum


@dataclasses.dataclass
class NodeInfo:
    """A node plus what is already placed on it (kept up to date by the reconciler within a pass)."""

    node: resources_pb2.Node
    allocated_memory: int = 0
    allocated_gpus: int = 0
    replicas: int = 0
    # Replicas per deployment, for spreading one deployment across nodes.
    per_deployment: dict[str, int] = dataclasses.field(default_factory=dict)
    # Digests this node holds or is pulling (its store's report plus our own placements).
    digests: set[str] = dataclasses.field(default_factory=set)

    @property
    def name(self) -> str:
        return self.node.name

    @property
    def free_memory(self) -> int | None:
        """None when the node did not report its memory: nothing to check against."""
        if not self.node.memory_bytes:
            return None
        return self.node.memory_bytes - self.allocated_memory

    def assign(self, request: "PlacementRequest") -> None:
        self.allocated_memory += request.memory_bytes
        self.allocated_gpus += request.gpus
        self.replicas += 1
        self.per_deployment[request.deployment] = self.per_deployment.get(request.deployment, 0) + 1
        if request.digest:
            self.digests.add(request.digest)

    def release(self, request: "PlacementRequest") -> None:
        self.allocated_memory -= request.memory_bytes
        self.allocated_gpus -= request.gpus
        self.replicas -= 1
        left = self.per_deployment.get(request.deployment, 0) - 1
        if left > 0:
            self.per_deployment[request.deployment] = left
        else:
            self.per_deployment.pop(request.deployment, None)


@dataclasses.dataclass(frozen=True)
class PlacementRequest:
    """What one replica asks of a node."""

    deployment: str
    memory_bytes: int = 0
    gpus: int = 0
    node_selector: Mapping[str, str] = dataclasses.field(default_factory=dict)
    # The model layer's digest, when known (locality).
    digest: str = ""


# Declared interfaces: a plugin subclasses the ones it implements (see clowder_common.plugins; registry.py).


@runtime_checkable
class Filter(Protocol):
    """Drops the nodes that cannot take a replica, and says why."""

    @abstractmethod
    def filter(self, request: PlacementRequest, nodes: Sequence[NodeInfo]) -> list[NodeInfo]:
        """The nodes that can take the replica, in the given order."""

    @abstractmethod
    def reason(self, request: PlacementRequest, rejected: int) -> str:
        """Why `rejected` nodes were dropped, for the pending replica's message."""


@runtime_checkable
class Scorer(Protocol):
    """Ranks the nodes that fit, by the convention of clowder_common.plugins.weighted_sum (as routing's do)."""

    @abstractmethod
    def score(self, request: PlacementRequest, nodes: Sequence[NodeInfo]) -> dict[str, float]:
        """Score in [0, 1] per node name; higher is better."""


@dataclasses.dataclass(frozen=True)
class Decision:
    node: NodeInfo | None
    # Why no node fits (empty when one was chosen).
    reason: str
    seconds: float


class Scheduler:
    def __init__(self, name: str, filters: Sequence[Instance[Filter]], scorers: Sequence[Instance[Scorer]]) -> None:
        self.name = name
        self.filters = list(filters)
        self.scorers = [s for s in scorers if s.weight > 0]

    def schedule(self, request: PlacementRequest, nodes: Sequence[NodeInfo]) -> Decision:
        """`nodes` sorted by name, so equal scores go to the first name."""
        started = time.perf_counter()
        if not nodes:
            return Decision(None, "no node is registered", time.perf_counter() - started)
        candidates: Sequence[NodeInfo] = nodes
        reasons = []
        for f in self.filters:
            kept = f.plugin.filter(request, candidates)
            if len(kept) < len(candidates):
                reasons.append(f.plugin.reason(request, len(candidates) - len(kept)))
            candidates = kept
            if not candidates:
                reason = f"0/{len(nodes)} nodes fit: " + "; ".join(reasons)
                return Decision(None, reason, time.perf_counter() - started)
        if len(candidates) == 1 or not self.scorers:
            return Decision(candidates[0], "", time.perf_counter() - started)
        totals = weighted_sum([n.name for n in candidates],
                              ((s.weight, s.plugin.score(request, candidates)) for s in self.scorers))
        # max() keeps the first of equals: the first name.
        best = max(candidates, key=lambda n: totals[n.name])
        return Decision(best, "", time.perf_counter() - started)
