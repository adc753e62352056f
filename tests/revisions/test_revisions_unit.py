"""Revisions without processes: the split's choice, the counters' windows and quantiles, the rollout's limits."""

from __future__ import annotations

import collections
import contextvars

import pytest

from clowder.controller.v1 import resources_pb2
from clowder_balancer.metrics import TTFT_BUCKETS
from clowder_balancer.traffic_split import Weighted, pick, session_point
from clowder_common.errors import InvalidArgument
from clowder_controller import revisions
from clowder_controller.rollout import MIN_REQUESTS, MIN_TTFT_SAMPLES, judge

pytestmark = pytest.mark.unit


def counters(service: str, revision: int, requests: int, errors: int, ttfts: list[float]):
    c = resources_pb2.RevisionCounters(service=service, revision=revision, requests=requests, errors=errors,
                                       ttft_count=len(ttfts))
    c.ttft_bounds.extend(TTFT_BUCKETS)
    c.ttft_buckets.extend(sum(1 for t in ttfts if t <= b) for b in TTFT_BUCKETS)
    return c


def test_pick_follows_the_weights():
    options = [Weighted("svc", 1, 70), Weighted("svc-r2", 2, 30)]
    counts = collections.Counter(pick(options, i / 1000).revision for i in range(1000))
    assert counts == {1: 700, 2: 300}


def test_a_session_falls_in_the_same_place_on_every_balancer():
    assert session_point("svc", "abc") == session_point("svc", "abc")
    points = [session_point("svc", f"s{i}") for i in range(2000)]
    assert 0 <= min(points) and max(points) < 1
    assert 0.45 < sum(p < 0.5 for p in points) / len(points) < 0.55  # spread evenly


def test_counters_sum_over_balancers_and_a_restarted_balancer_starts_afresh():
    a = resources_pb2.RevisionTrafficReport(balancer="a", revisions=[counters("svc", 2, 10, 1, [0.1] * 10)])
    b = resources_pb2.RevisionTrafficReport(balancer="b", revisions=[counters("svc", 2, 5, 0, [0.3] * 5)])
    total = revisions.sum_reports([a, b])[("svc", 2)]
    assert (total.requests, total.errors, total.ttft_count) == (15, 1, 15)
    later = counters("svc", 2, 25, 4, [0.1] * 25)
    window = revisions.since(later, total)
    assert (window.requests, window.errors, window.ttft_count) == (10, 3, 10)
    # Fewer than at the window's start: a balancer restarted; what it reports is all that is known.
    assert revisions.since(counters("svc", 2, 3, 0, []), total).requests == 3


def test_p95_interpolates_within_its_bucket_like_prometheus():
    c = counters("svc", 1, 100, 0, [0.03] * 90 + [0.2] * 10)
    # Rank 95 of 100 falls in (0.1, 0.25], half way through its 10 observations.
    assert revisions.quantile(c) == pytest.approx(0.175)
    assert revisions.quantile(counters("svc", 1, 0, 0, [])) == 0.0


@pytest.mark.parametrize("policy, field", [
    (resources_pb2.RolloutPolicy(steps=[50, 10]), "rollout.steps[1]"),
    (resources_pb2.RolloutPolicy(steps=[0, 10]), "rollout.steps[0]"),
    (resources_pb2.RolloutPolicy(steps=[101]), "rollout.steps[0]"),
    (resources_pb2.RolloutPolicy(max_error_rate=1.5), "rollout.maxErrorRate"),
    (resources_pb2.RolloutPolicy(interval_s=-1), "rollout.interval"),
])
def test_bad_policies_name_the_field(policy, field):
    with pytest.raises(InvalidArgument) as err:
        revisions.normalized_policy(policy)
    assert err.value.violations[0].field == field


def test_policy_defaults_and_the_last_step_is_everything():
    policy = revisions.normalized_policy(resources_pb2.RolloutPolicy(steps=[10, 50]))
    assert list(policy.steps) == [10, 50, 100]
    assert (policy.interval_s, policy.max_error_rate, policy.max_ttft_ratio) == (60, 0.05, 1.5)


def rolling_out(policy: resources_pb2.RolloutPolicy) -> resources_pb2.Service:
    service = resources_pb2.Service(name="svc")
    service.revisions.add(number=1, deployment="svc")
    service.revisions.add(number=2, deployment="svc-r2")
    service.rollout.policy.CopyFrom(revisions.normalized_policy(policy))
    service.rollout.state = revisions.PROGRESSING
    service.rollout.stable_revision, service.rollout.candidate_revision = 1, 2
    return service


def test_judge_breaks_on_error_rate_and_ttft_ratio_only_with_enough_requests():
    service = rolling_out(resources_pb2.RolloutPolicy(max_error_rate=0.1, max_ttft_ratio=2))
    fast, slow = [0.04] * 20, [0.4] * 20
    base = {("svc", 1): counters("svc", 1, 20, 0, fast)}
    assert judge(service, {**base, ("svc", 2): counters("svc", 2, 20, 1, fast)}) == ""
    assert "error rate" in judge(service, {**base, ("svc", 2): counters("svc", 2, 20, 5, fast)})
    assert "time to first token" in judge(service, {**base, ("svc", 2): counters("svc", 2, 20, 0, slow)})
    few = MIN_REQUESTS - 1
    assert judge(service, {**base, ("svc", 2): counters("svc", 2, few, few, [0.4] * few)}) == ""
    # Time to first token: only at the end of a step, and only on enough first tokens.
    assert judge(service, {**base, ("svc", 2): counters("svc", 2, 20, 0, slow)}, step_done=False) == ""
    some = MIN_TTFT_SAMPLES - 1
    assert judge(service, {**base, ("svc", 2): counters("svc", 2, some, 0, [0.4] * some)}) == ""
    # Errors count at once, mid-step.
    assert "error rate" in judge(service, {**base, ("svc", 2): counters("svc", 2, 20, 5, fast)}, step_done=False)
    # Counted from the window's baseline: errors before the step began do not count.
    revisions.set_baseline(service, {("svc", 2): counters("svc", 2, 20, 5, fast)})
    assert judge(service, {**base, ("svc", 2): counters("svc", 2, 40, 5, fast * 2)}) == ""


def test_retired_deployments_are_those_of_revisions_without_traffic():
    service = rolling_out(resources_pb2.RolloutPolicy())
    service.traffic.add(revision=1, percent=100)
    assert revisions.retired_deployments(service) == set()
    revisions.promote(service, "test", {})
    assert [(t.revision, t.percent) for t in service.traffic] == [(2, 100)]
    assert revisions.retired_deployments(service) == {"svc"}
    assert service.events[-1].reason == "promoted"


class Directory:
    """The one ServiceDirectory method the split reads, over a fixed record."""

    def __init__(self, service: resources_pb2.Service) -> None:
        self._service = service

    def get(self, name: str):
        return self._service if name == self._service.name else None


def split_service() -> resources_pb2.Service:
    service = resources_pb2.Service(name="svc")
    service.revisions.add(number=1, deployment="svc")
    service.revisions.add(number=2, deployment="svc-r2")
    service.revisions.add(number=3, deployment="svc-r3")
    service.rollout.stable_revision, service.rollout.candidate_revision = 1, 2
    service.traffic.add(revision=1, percent=50)
    service.traffic.add(revision=2, percent=50)
    return service


def test_the_split_pins_falls_back_and_keeps_sessions():
    # In a context of its own: what begin() sets must not outlive the test.
    contextvars.copy_context().run(split_checks)


def split_checks():
    from prometheus_client import CollectorRegistry

    from clowder_balancer import traffic_split
    from clowder_common.errors import FailedPrecondition, NotFound

    ready = {"svc", "svc-r2"}
    split = traffic_split.TrafficSplit(Directory(split_service()), lambda d: d in ready, CollectorRegistry())
    assert split.choose("other") is None  # not a service: routed as a deployment
    traffic_split.begin("2")
    assert split.choose("svc").deployment == "svc-r2"
    assert traffic_split.response_headers() == {traffic_split.REVISION_HEADER: "2"}
    for pin, error in (("9", NotFound), ("3", FailedPrecondition), ("two", InvalidArgument)):
        traffic_split.begin(pin)
        with pytest.raises(error):
            split.choose("svc")
    # Another choice of the same request (n > 1) takes the first one's revision.
    traffic_split.begin("")
    first = split.choose("svc").revision
    assert all(split.choose("svc").revision == first for _ in range(20))
    # A session keeps its revision from request to request.
    sessions = {}
    for _ in range(3):
        for name in ("a", "b", "c", "d", "e", "f"):
            traffic_split.begin("")
            sessions.setdefault(name, set()).add(split.choose("svc", session=name).revision)
    assert all(len(found) == 1 for found in sessions.values()) and set().union(*sessions.values()) == {1, 2}
    # A revision without a ready replica gives its share to those that have one.
    ready.discard("svc-r2")
    for _ in range(20):
        traffic_split.begin("")
        assert split.choose("svc").revision == 1
    ready.add("svc-r2")
    # Outside a request a face began (a background job), every call chooses afresh.
    traffic_split._SERVED.set(None)
    assert {split.choose("svc").revision for _ in range(50)} == {1, 2}
