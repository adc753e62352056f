"""The shapes every routing plugin shares: a candidate replica, the request as routing sees it, the plugin protocols."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, Sequence


@dataclass(frozen=True)
class Candidate:
    """A ready replica as the router sees it at the moment of choice."""

    replica_id: str
    address: str
    # Requests this balancer has routed to the replica and not yet finished.
    in_flight: int
    # What the runtime last said about itself (GetStats): sequences decoding and queued, all balancers included.
    running: int = 0
    waiting: int = 0
    # Outlier detection took the replica out of rotation for a while.
    ejected: bool = False
    # False once stats polls keep failing: the endpoint lease may outlive a dead process by its TTL.
    reachable: bool = True
    # LoRA adapters the replica has loaded (empty until runtimes advertise them).
    adapters: frozenset[str] = frozenset()

    @property
    def load(self) -> int:
        """Work ahead of a new request: our own in-flight count is fresh, the runtime's figures cover the rest."""
        return max(self.in_flight, self.running) + self.waiting


@dataclass(frozen=True)
class RouteRequest:
    """What routing knows of a request before it is sent."""

    model: str
    # Chained hashes of the prompt's fixed-size blocks (prefix_index.block_hashes).
    blocks: tuple[int, ...] = ()
    # Client-chosen affinity key (a header); empty when absent.
    session: str = ""
    # Requested LoRA adapter; empty for the base model.
    adapter: str = ""
    extra: dict = field(default_factory=dict, compare=False)


class Filter(Protocol):
    name: str
    # A soft filter that would leave nothing is skipped (better a poor replica than none); a hard one is not.
    hard: bool

    def filter(self, request: RouteRequest, candidates: Sequence[Candidate]) -> list[Candidate]: ...


class Scorer(Protocol):
    name: str

    def score(self, request: RouteRequest, candidates: Sequence[Candidate]) -> dict[str, float]:
        """Score in [0, 1] per candidate address; higher is better."""
        ...


class Picker(Protocol):
    def pick(self, candidates: Sequence[Candidate]) -> Candidate:
        """Choose one of `candidates` (never empty)."""
        ...


class ScoredPicker(Protocol):
    def pick_scored(self, scored: Sequence[tuple[Candidate, float]]) -> Candidate: ...


class Observer(Protocol):
    """Plugins that learn from what was routed where (prefix index, session table)."""

    def routed(self, request: RouteRequest, chosen: Candidate) -> None: ...

    def prefilled(self, request: RouteRequest, chosen: Candidate) -> None:
        """Once per routed(): the attempt's first message came, or the attempt ended without one."""
        ...

    def finished(self, request: RouteRequest, chosen: Candidate, blocks: tuple[int, ...]) -> None: ...

    def forget(self, address: str) -> None: ...
