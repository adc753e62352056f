"""Routing filters: each keeps exactly the candidates it should, and the adapter filter refuses when none can serve."""

from __future__ import annotations

import pytest

from clowder_common.errors import Unavailable

from clowder_balancer.routing.base import Candidate, RouteRequest
from clowder_balancer.routing.filters import AdapterFilter, NotEjectedFilter, ReadyFilter, SaturationFilter

pytestmark = pytest.mark.unit


def c(rid: str, **kw) -> Candidate:
    return Candidate(rid, f"addr-{rid}", kw.pop("in_flight", 0), **kw)


@pytest.mark.parametrize(
    ("plugin", "request_", "candidates", "kept"),
    [
        (ReadyFilter(), RouteRequest("m"), [c("a"), c("b", reachable=False)], ["a"]),
        (ReadyFilter(), RouteRequest("m"), [c("a", reachable=False)], []),
        (NotEjectedFilter(), RouteRequest("m"), [c("a", ejected=True), c("b")], ["b"]),
        (NotEjectedFilter(), RouteRequest("m"), [c("a"), c("b")], ["a", "b"]),
        # load = max(in_flight, running) + waiting
        (SaturationFilter(4), RouteRequest("m"), [c("a", in_flight=4), c("b", in_flight=3)], ["b"]),
        (SaturationFilter(4), RouteRequest("m"), [c("a", running=2, waiting=2), c("b", running=3)], ["b"]),
        (SaturationFilter(4), RouteRequest("m"), [c("a", in_flight=3, running=1, waiting=1)], []),
        (AdapterFilter(), RouteRequest("m"), [c("a"), c("b", adapters=frozenset({"x"}))], ["a", "b"]),
        (AdapterFilter(), RouteRequest("m", adapter="x"), [c("a"), c("b", adapters=frozenset({"x", "y"}))], ["b"]),
    ],
)
def test_filter_keeps(plugin, request_, candidates, kept) -> None:
    assert [k.replica_id for k in plugin.filter(request_, candidates)] == kept


def test_only_the_adapter_filter_is_hard() -> None:
    assert AdapterFilter.hard and not ReadyFilter.hard and not NotEjectedFilter.hard and not SaturationFilter.hard


def test_adapter_filter_refuses_when_no_replica_has_the_adapter() -> None:
    with pytest.raises(Unavailable) as info:
        AdapterFilter().filter(RouteRequest("m", adapter="x"), [c("a", adapters=frozenset({"y"}))])
    assert info.value.reason == "NO_REPLICA_WITH_ADAPTER"
