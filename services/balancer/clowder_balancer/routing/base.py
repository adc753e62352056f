"""The shapes every routing plugin shares: a candidate replica, the request as routing sees it, the plugin interfaces."""

from __future__ import annotations

import random
from abc import abstractmethod
from dataclasses import dataclass, field
from typing import Any, Protocol, Sequence, runtime_checkable

from clowder_balancer.routing.prefix_index import DEFAULT_BLOCK_CHARS


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


@dataclass(frozen=True)
class RoutingEnv:
    """What every routing plugin factory is handed besides its own parameters."""

    # Characters per prompt block: the router hashes prompts at this size, prefix plugins index at it.
    block_chars: int = DEFAULT_BLOCK_CHARS
    # Random tie-breaking (a seeded one in tests); None: each picker its own.
    rng: random.Random | None = None


# The interfaces below are declared, not guessed: a plugin subclasses the ones it implements (mypy checks the
# signatures; an abstract method left out cannot be instantiated), and the registry refuses a plugin that has
# part of one (a misspelled hook would otherwise never run).


@runtime_checkable
class Filter(Protocol):
    """Narrows the candidates. A soft filter that would leave nothing is skipped (better a poor replica than
    none); a hard one raises instead."""

    hard: bool

    @abstractmethod
    def filter(self, request: RouteRequest, candidates: Sequence[Candidate]) -> list[Candidate]: ...


@runtime_checkable
class Scorer(Protocol):
    """Ranks the candidates (clowder_common.plugins.weighted_sum: the profile's weights combine them)."""

    @abstractmethod
    def score(self, request: RouteRequest, candidates: Sequence[Candidate]) -> dict[str, float]:
        """Score in [0, 1] per candidate address; higher is better."""


@runtime_checkable
class Picker(Protocol):
    """Chooses one candidate from the survivors of the filters with their weighted scores."""

    @abstractmethod
    def pick(self, scored: Sequence[tuple[Candidate, float]]) -> Candidate:
        """One of the candidates of `scored`; ValueError when it is empty."""


@runtime_checkable
class Observer(Protocol):
    """Learns from what was routed where (prefix index, session table)."""

    @abstractmethod
    def routed(self, request: RouteRequest, chosen: Candidate) -> None:
        """An attempt of `request` was sent to `chosen`."""

    @abstractmethod
    def prefilled(self, request: RouteRequest, chosen: Candidate) -> None:
        """Once per routed(): the attempt's first message came, or the attempt ended without one."""

    @abstractmethod
    def finished(self, request: RouteRequest, chosen: Candidate, blocks: tuple[int, ...]) -> None:
        """The attempt completed; `blocks` hash its prompt and answer (empty unless a BlockReader is in use)."""

    @abstractmethod
    def forget(self, address: str) -> None:
        """The replica at `address` deregistered: what was learnt of it is void (a restart comes back cold)."""


@runtime_checkable
class StatsConsumer(Protocol):
    """Hears each runtime's GetStats report (stats.RuntimeStats) as it is polled."""

    @abstractmethod
    def runtime_report(self, address: str, stats: Any) -> None: ...


@runtime_checkable
class BlockReader(Protocol):
    """Reads RouteRequest.blocks: the router hashes prompts (and answers) only when a profile has one."""

    block_chars: int


HOOKS: tuple[type, ...] = (Observer, StatsConsumer, BlockReader)
