"""The scheduler: run the filters, then the weighted scorers, and pick the best node (ties by name)."""

from __future__ import annotations

import dataclasses
import time
from typing import Mapping, Protocol, Sequence

from clowder.controller.v1 import resources_pb2


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


class Filter(Protocol):
    name: str

    def filter(self, request: PlacementRequest, nodes: Sequence[NodeInfo]) -> list[NodeInfo]:
        """The nodes that can take the replica, in the given order."""

    def reason(self, request: PlacementRequest, rejected: int) -> str:
        """Why `rejected` nodes were dropped, for the pending replica's message."""


class Scorer(Protocol):
    name: str

    def score(self, request: PlacementRequest, nodes: Sequence[NodeInfo]) -> list[float]:
        """One score in [0, 1] per node, higher is better."""


@dataclasses.dataclass(frozen=True)
class Decision:
    node: NodeInfo | None
    # Why no node fits (empty when one was chosen).
    reason: str
    seconds: float


class Scheduler:
    def __init__(self, filters: Sequence[Filter], scorers: Sequence[tuple[Scorer, float]]) -> None:
        self.filters = list(filters)
        self.scorers = [(s, w) for s, w in scorers if w > 0]

    def schedule(self, request: PlacementRequest, nodes: Sequence[NodeInfo]) -> Decision:
        """`nodes` sorted by name, so equal scores go to the first name."""
        started = time.perf_counter()
        if not nodes:
            return Decision(None, "no node is registered", time.perf_counter() - started)
        candidates: Sequence[NodeInfo] = nodes
        reasons = []
        for f in self.filters:
            kept = f.filter(request, candidates)
            if len(kept) < len(candidates):
                reasons.append(f.reason(request, len(candidates) - len(kept)))
            candidates = kept
            if not candidates:
                reason = f"0/{len(nodes)} nodes fit: " + "; ".join(reasons)
                return Decision(None, reason, time.perf_counter() - started)
        if len(candidates) == 1 or not self.scorers:
            return Decision(candidates[0], "", time.perf_counter() - started)
        totals = [0.0] * len(candidates)
        for scorer, weight in self.scorers:
            for i, value in enumerate(scorer.score(request, candidates)):
                totals[i] += weight * value
        best = max(range(len(candidates)), key=totals.__getitem__)
        return Decision(candidates[best], "", time.perf_counter() - started)
