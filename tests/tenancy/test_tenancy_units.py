"""Pure parts of tenancy: the GCRA and budget arithmetic of quota.admit/settle, and the fair queue's order."""

from __future__ import annotations

import asyncio

import pytest
from prometheus_client import CollectorRegistry

from clowder.balancer.v1 import apikeys_pb2
from clowder_common.errors import ResourceExhausted

from clowder_balancer.apikeys import Limits
from clowder_balancer.tenancy.fairness import FairQueue
from clowder_balancer.tenancy.quota import Reservation, _Refused, admit, budget_period, settle

pytestmark = pytest.mark.unit

CRITICAL, STANDARD, SHEDDABLE = (apikeys_pb2.PRIORITY_CLASS_CRITICAL, apikeys_pb2.PRIORITY_CLASS_STANDARD,
                                 apikeys_pb2.PRIORITY_CLASS_SHEDDABLE)
NOW = 1_800_000_000.0


def test_requests_per_minute_are_never_more_than_the_limit_in_any_minute():
    state, limits = apikeys_pb2.QuotaState(), Limits(rpm=10)
    for i in range(10):
        admit(state, limits, NOW + i, 1, 1)
    with pytest.raises(_Refused) as refused:
        admit(state, limits, NOW + 30, 1, 1)
    assert refused.value.error.reason == "RATE_LIMIT_EXCEEDED" and 29 <= refused.value.error.retry_after <= 30
    # A minute after the first, one more; not two.
    admit(state, limits, NOW + 60.5, 1, 1)
    with pytest.raises(_Refused):
        admit(state, limits, NOW + 60.6, 1, 1)
    assert len(state.request_times) == 10


def test_high_request_limits_are_a_bucket_refilled_over_the_minute():
    state, limits = apikeys_pb2.QuotaState(), Limits(rpm=1200)
    for _ in range(1200):
        admit(state, limits, NOW, 1, 1)
    with pytest.raises(_Refused):
        admit(state, limits, NOW + 0.01, 1, 1)
    # One request's worth (60 s / 1200) later, one more gets in; no list of times is kept.
    admit(state, limits, NOW + 0.05, 1, 1)
    assert not state.request_times


def test_tokens_per_minute_count_the_estimate_then_the_real_use():
    state, limits = apikeys_pb2.QuotaState(), Limits(tpm=100)
    admit(state, limits, NOW, 80, 10)
    admit(state, limits, NOW, 30, 10)  # under the limit when admitted: in
    with pytest.raises(_Refused):
        admit(state, limits, NOW, 1, 1)
    # Both used far less than estimated: settling gives the room back.
    period = budget_period(limits, NOW)
    settle(state, Reservation("k", limits, 80, period, None, 0, False), 5)
    settle(state, Reservation("k", limits, 30, period, None, 0, False), 5)
    admit(state, limits, NOW, 1, 1)


def test_budget_reserves_caps_max_tokens_and_refuses_when_used_up():
    state, limits = apikeys_pb2.QuotaState(), Limits(budget_tokens=100)
    max_completion, reserved = admit(state, limits, NOW, 60, 10)
    assert (max_completion, reserved) == (90, 60)
    # What is left (40, less this prompt's 10) caps the next request; 40 more are reserved.
    max_completion, reserved = admit(state, limits, NOW, 60, 10)
    assert (max_completion, reserved) == (30, 40)
    with pytest.raises(_Refused) as refused:
        admit(state, limits, NOW, 1, 1)
    assert refused.value.error.reason == "INSUFFICIENT_QUOTA"
    period = budget_period(limits, NOW)
    settle(state, Reservation("k", limits, 60, period, 90, 60, False), 20)
    assert (state.budget_used, state.budget_reserved) == (20, 40)
    # The next day starts afresh.
    admit(state, limits, NOW + 86_400, 60, 10)
    assert state.budget_used == 0


async def _run(queue: FairQueue, model: str, tenant: str, priority: int, order: list[str], hold: asyncio.Event):
    await queue.acquire(model, tenant, priority)
    order.append(tenant)
    await hold.wait()
    queue.release(model, tenant)


async def test_tenants_take_turns_and_higher_classes_go_first():
    queue = FairQueue(lambda model: 1, CollectorRegistry(), max_queue=100, timeout_s=10)
    order: list[str] = []
    gates = [asyncio.Event() for _ in range(12)]
    tasks = [asyncio.create_task(_run(queue, "m", "a", STANDARD, order, gates[0]))]
    await asyncio.sleep(0)
    # A burst from a, then b's two requests, then one critical request from c.
    for i in range(1, 8):
        tasks.append(asyncio.create_task(_run(queue, "m", "a", STANDARD, order, gates[i])))
    for i in (8, 9):
        tasks.append(asyncio.create_task(_run(queue, "m", "b", STANDARD, order, gates[i])))
    tasks.append(asyncio.create_task(_run(queue, "m", "c", CRITICAL, order, gates[10])))
    await asyncio.sleep(0.01)
    assert queue.depth("m") == 10
    for gate in gates:
        gate.set()
        await asyncio.sleep(0.01)
    await asyncio.wait_for(asyncio.gather(*tasks), 5)
    assert order == ["a", "c", "a", "b", "a", "b", "a", "a", "a", "a", "a"]


async def test_sheddable_is_refused_when_the_queue_is_full_and_gives_way_to_higher_classes():
    queue = FairQueue(lambda model: 1, CollectorRegistry(), max_queue=2, timeout_s=10)
    hold = asyncio.Event()
    order: list[str] = []
    running = asyncio.create_task(_run(queue, "m", "x", STANDARD, order, hold))
    await asyncio.sleep(0)
    shed = [asyncio.create_task(_run(queue, "m", "s", SHEDDABLE, order, hold)) for _ in range(2)]
    await asyncio.sleep(0.01)
    with pytest.raises(ResourceExhausted):
        await _run(queue, "m", "s", SHEDDABLE, order, hold)
    # A standard request takes the latest sheddable one's place, which gets 429.
    standard = asyncio.create_task(_run(queue, "m", "y", STANDARD, order, hold))
    await asyncio.sleep(0.01)
    hold.set()
    results = await asyncio.wait_for(asyncio.gather(running, *shed, standard, return_exceptions=True), 5)
    assert sum(isinstance(r, ResourceExhausted) for r in results) == 1
    assert order == ["x", "y", "s"]


async def test_a_request_that_gives_up_waiting_leaves_no_trace():
    queue = FairQueue(lambda model: 1, CollectorRegistry(), max_queue=10, timeout_s=0.2)
    await queue.acquire("m", "a", STANDARD)
    with pytest.raises(Exception) as waited:
        await queue.acquire("m", "b", STANDARD)
    assert "saturated" in str(waited.value)
    cancelled = asyncio.create_task(queue.acquire("m", "c", STANDARD))
    await asyncio.sleep(0.01)
    cancelled.cancel()
    await asyncio.sleep(0.01)
    assert queue.depth("m") == 0
    queue.release("m", "a")
    await asyncio.wait_for(queue.acquire("m", "d", STANDARD), 1)


async def test_a_slot_is_kept_for_a_light_tenant_seen_lately_and_freed_when_it_stays_away():
    queue = FairQueue(lambda model: 2, CollectorRegistry(), max_queue=100, timeout_s=10, idle_window_s=0.5)
    # Alone, a tenant uses every slot.
    await queue.acquire("m", "a", STANDARD)
    await asyncio.wait_for(queue.acquire("m", "a", STANDARD), 1)
    queue.release("m", "a")
    queue.release("m", "a")
    # b came and went: while it may come back, a flood from a leaves it one slot.
    await queue.acquire("m", "b", STANDARD)
    queue.release("m", "b")
    await queue.acquire("m", "a", STANDARD)
    flooding = asyncio.create_task(queue.acquire("m", "a", STANDARD))
    await asyncio.sleep(0.05)
    assert not flooding.done() and queue.depth("m") == 1
    await asyncio.wait_for(queue.acquire("m", "b", STANDARD), 0.1)  # at once: its slot was free
    queue.release("m", "b")
    # b stays away: after the window the kept slot goes to a's queued request.
    await asyncio.wait_for(flooding, 2)
    assert queue.depth("m") == 0
