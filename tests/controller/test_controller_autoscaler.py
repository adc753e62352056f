"""Autoscaler: decisions from balancer load, and the real loop driven by BalancerLoad values in etcd."""

from __future__ import annotations

import asyncio

import pytest

from clowder.balancer.v1 import load_pb2
from clowder.controller.v1 import resources_pb2
from clowder_common import keys
from clowder_controller.autoscaler import Autoscaler, History, Load, Windows, decide, sum_loads
from clowder_controller.events import EventRecorder, read_events

from helpers.wait import wait_for

NOW = 1_000_000.0


def dep(replicas, min_r=1, max_r=10, target=2.0, zero_after=0):
    return resources_pb2.Deployment(name="d", replicas=replicas, min_replicas=min_r, max_replicas=max_r,
                                    target_in_flight=target, scale_to_zero_after_s=zero_after)


@pytest.mark.unit
@pytest.mark.parametrize("deployment, load, expected", [
    (dep(1), Load(in_flight=2), 1),                       # at target
    (dep(1), Load(in_flight=7), 4),                       # ceil(7 / 2)
    (dep(1), Load(in_flight=100), 10),                    # capped by max
    (dep(3, min_r=3), Load(), 3),                         # floored by min
    (dep(0, min_r=0, zero_after=60), Load(waiting=1), 1),  # activation from zero
    (dep(0, min_r=0, zero_after=60), Load(waiting=9), 5),  # activation sized by the queue
    (dep(2, target=0), Load(in_flight=12), 3),            # target 0 means 4
])
def test_decide(deployment, load, expected):
    history = History(first_seen=NOW - 1000)
    wanted, why = decide(deployment, load, history, NOW, Windows(up_s=0, down_s=30))
    assert wanted == expected
    assert why or wanted == deployment.replicas


@pytest.mark.unit
def test_scale_down_waits_for_the_down_window():
    history = History(first_seen=NOW - 1000)
    windows = Windows(up_s=0, down_s=30)
    assert decide(dep(1), Load(in_flight=8), history, NOW, windows)[0] == 4
    # Load drops: the recommendation of 4 from 10 s ago still holds ...
    assert decide(dep(4), Load(in_flight=1), history, NOW + 10, windows)[0] == 4
    # ... until it leaves the window.
    assert decide(dep(4), Load(in_flight=1), history, NOW + 31, windows)[0] == 1


@pytest.mark.unit
def test_scale_up_window_takes_the_lowest_recent_recommendation():
    history = History(first_seen=NOW - 1000)
    windows = Windows(up_s=10, down_s=30)
    assert decide(dep(1), Load(in_flight=2), history, NOW, windows)[0] == 1
    # A spike 5 s later is not trusted yet (the window still holds a 1) ...
    assert decide(dep(1), Load(in_flight=8), history, NOW + 5, windows)[0] == 1
    # ... but once it has lasted the window, it is.
    assert decide(dep(1), Load(in_flight=8), history, NOW + 16, windows)[0] == 4


@pytest.mark.unit
@pytest.mark.parametrize("last_request_ago, demand, min_r, zero_after, expected", [
    (120, 0, 0, 60, 0),     # idle long enough
    (30, 0, 0, 60, 1),      # not yet
    (120, 1, 0, 60, 1),     # in flight now: not idle
    (120, 0, 1, 60, 1),     # min 1 never goes to zero
    (120, 0, 0, 0, 1),      # scale to zero off
])
def test_scale_to_zero(last_request_ago, demand, min_r, zero_after, expected):
    history = History(first_seen=NOW - 1000)
    load = Load(in_flight=demand, last_request=NOW - last_request_ago)
    assert decide(dep(1, min_r=min_r, zero_after=zero_after), load, history, NOW, Windows())[0] == expected


@pytest.mark.unit
def test_a_deployment_at_zero_stays_there_without_requests():
    history = History(first_seen=NOW)
    assert decide(dep(0, min_r=0, zero_after=60), Load(), history, NOW + 1, Windows())[0] == 0
    # ... but one that may not sleep is brought to one replica.
    assert decide(dep(0, min_r=0, zero_after=0), Load(), history, NOW + 1, Windows())[0] == 1


@pytest.mark.unit
def test_a_new_deployment_is_not_idle_before_its_time():
    history = History(first_seen=NOW)
    assert decide(dep(1, min_r=0, zero_after=60), Load(), history, NOW + 30, Windows())[0] == 1


@pytest.mark.unit
def test_loads_sum_over_balancers():
    a = load_pb2.BalancerLoad(balancer="a", deployments={"d": load_pb2.DeploymentLoad(in_flight=2, waiting=1)})
    b = load_pb2.BalancerLoad(balancer="b", deployments={"d": load_pb2.DeploymentLoad(in_flight=3),
                                                         "e": load_pb2.DeploymentLoad(waiting=4)})
    b.deployments["d"].last_request_time.FromSeconds(500)
    totals = sum_loads([a, b])
    assert totals["d"] == Load(in_flight=5, waiting=1, last_request=500.0)
    assert totals["e"] == Load(waiting=4)


@pytest.mark.inprocess
async def test_autoscaler_follows_balancer_reports_in_etcd(state):
    """Reports written the way balancers write them (load/<balancer> on a lease) move Deployment.replicas."""
    key = state.key(keys.deployment("d"))
    await state.put(key, dep(1, min_r=0, max_r=5, target=2, zero_after=2))
    events = EventRecorder(state, interval=0.1)
    events.start()
    scaler = Autoscaler(state, events, interval_s=0.2, windows=Windows(up_s=0, down_s=1))
    await scaler.start()
    lease = await state.grant_lease(10)

    async def report(balancer, in_flight=0, waiting=0, requested=True):
        load = load_pb2.DeploymentLoad(in_flight=in_flight, waiting=waiting)
        if requested:
            load.last_request_time.GetCurrentTime()
        await state.put(state.key(keys.load(balancer)),
                        load_pb2.BalancerLoad(balancer=balancer, deployments={"d": load}), lease=lease)

    async def replicas_are(n):
        return (await state.get(key, resources_pb2.Deployment)).value.replicas == n

    try:
        # Two balancers carry 7 requests: ceil(7 / 2) = 4 replicas, at once.
        await report("b1", in_flight=4)
        await report("b2", in_flight=3)
        await wait_for(lambda: replicas_are(4), 10, "scale up to 4")
        # Load falls to 1: down to 1 only after the down window, not at once.
        await report("b1", in_flight=1)
        await report("b2", in_flight=0)
        await asyncio.sleep(0.4)
        assert await replicas_are(4)
        await wait_for(lambda: replicas_are(1), 10, "scale down to 1")
        # Idle (no request for scale_to_zero_after_s): to zero.
        await report("b1", requested=False)
        await report("b2", requested=False)
        await wait_for(lambda: replicas_are(0), 10, "scale to zero")
        # A request held by one balancer wakes it.
        await report("b2", waiting=1)
        await wait_for(lambda: replicas_are(1), 5, "activation from zero")
        await events.flush()
        scaled = [e.message for e in await read_events(state, "d") if e.reason == "scaled"]
        assert any(" -> 4: " in m for m in scaled) and any(m.startswith("replicas 1 -> 0: idle") for m in scaled)
        assert scaled[-1].startswith("replicas 0 -> 1: activated")
    finally:
        await scaler.stop()
        await events.stop()
        await state.revoke_lease(lease)
