"""What batch work may start on a deployment: free slots after interactive traffic and a reserve."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from clowder_balancer.batch.capacity import UNKNOWN_SLOTS, Capacity
from clowder_balancer.discovery import ReadyEndpoint
from clowder_balancer.stats import RuntimeStats

pytestmark = pytest.mark.unit


@dataclass
class FakeDiscovery:
    replicas: dict[str, list[str]] = field(default_factory=dict)

    def has_model(self, model: str) -> bool:
        return model in self.replicas

    def endpoints(self, model: str) -> list[ReadyEndpoint]:
        return [ReadyEndpoint(a, a) for a in self.replicas.get(model, [])]


class FakeStats:
    def __init__(self, stats: dict[str, RuntimeStats]) -> None:
        self._stats = stats

    def get(self, address: str) -> RuntimeStats:
        return self._stats.get(address) or RuntimeStats()


class FakeRouter:
    def __init__(self, stats: dict[str, RuntimeStats], in_flight: dict[str, int]) -> None:
        self.stats = FakeStats(stats)
        self._in_flight = in_flight

    def in_flight(self, address: str) -> int:
        return self._in_flight.get(address, 0)


def stats(running: int = 0, waiting: int = 0, slots: int = 8, failures: int = 0) -> RuntimeStats:
    s = RuntimeStats(running=running, waiting=waiting, failures=failures)
    s.slots = slots
    return s


@pytest.mark.parametrize("name, replicas, polled, local, batch, recent, reserve, expected", [
    ("idle replica: all slots but the reserve", ["a"], {"a": stats()}, {}, 0, 0, 1, 7),
    ("interactive running takes slots first", ["a"], {"a": stats(running=5)}, {}, 0, 0, 1, 2),
    ("requests queued in a runtime: no batch work", ["a"], {"a": stats(running=8, waiting=1)}, {}, 0, 0, 1, 0),
    ("this balancer's in-flight counts before the poll sees it", ["a"], {"a": stats()}, {"a": 6}, 0, 0, 1, 1),
    ("batch lines just sent count too", ["a"], {"a": stats()}, {}, 4, 0, 1, 3),
    ("lines that just ended free their slots before the next poll", ["a"], {"a": stats(running=7)}, {}, 0, 3, 1,
     3),
    ("slots add up over replicas", ["a", "b"], {"a": stats(running=2), "b": stats(slots=4)}, {}, 0, 0, 1, 9),
    ("an unreachable replica offers nothing", ["a", "b"], {"a": stats(), "b": stats(failures=5)}, {}, 0, 0, 1, 7),
    ("slots not polled yet: a modest guess", ["a"], {}, {}, 0, 0, 0, UNKNOWN_SLOTS),
    ("a one-slot replica still takes one line when idle", ["a"], {"a": stats(slots=1)}, {}, 0, 0, 1, 1),
    ("scaled to zero: one line waits and wakes it", [], {}, {}, 0, 0, 1, 1),
    ("scaled to zero: only one", [], {}, {}, 1, 0, 1, 0),
])
def test_free_slots(name, replicas, polled, local, batch, recent, reserve, expected):
    capacity = Capacity(FakeDiscovery({"smol": replicas}), FakeRouter(polled, local), reserve)  # type: ignore[arg-type]
    assert capacity.free("smol", batch, recent) == expected, name


def test_unknown_model_is_not_held_back():
    capacity = Capacity(FakeDiscovery({}), FakeRouter({}, {}), 1)  # type: ignore[arg-type]
    assert capacity.free("ghost", 5) == 1
