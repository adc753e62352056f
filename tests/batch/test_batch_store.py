"""Batch state in a real etcd: a line's outcome is written once, claims are exclusive and die with their lease."""

from __future__ import annotations

import asyncio

import pytest

from clowder.balancer.v1 import batch_pb2
from clowder_balancer.batch.store import BatchStore

pytestmark = pytest.mark.inprocess


def result(status: int, custom_id: str = "a") -> batch_pb2.BatchResult:
    return batch_pb2.BatchResult(custom_id=custom_id, status_code=status, body_json="{}")


async def test_an_outcome_is_recorded_once_whatever_the_second_one_says(state):
    store = BatchStore(state)
    assert await store.put_result("batch_1", 0, result(200))
    assert not await store.put_result("batch_1", 0, result(200))
    assert not await store.put_result("batch_1", 0, result(503))
    assert await store.put_result("batch_1", 1, result(404, "b"))
    assert await store.result_outcomes("batch_1") == {0: True, 1: False}
    stored = await store.results("batch_1")
    assert (stored[0].status_code, stored[1].custom_id) == (200, "b")
    await store.clear("batch_1")
    assert await store.result_outcomes("batch_1") == {}


async def test_a_claim_is_exclusive_released_only_by_its_holder_and_gone_with_its_lease(state):
    store = BatchStore(state)
    first, second = await state.grant_lease(2), await state.grant_lease(30)
    assert await store.claim("batch_1", "000000", "b1", first)
    assert not await store.claim("batch_1", "000000", "b2", second)
    await store.release("batch_1", "000000", second)  # not its claim: nothing happens
    assert set(await store.claims("batch_1")) == {"000000"}
    # The holder dies (its lease is not refreshed): the chunk is free again once the TTL has passed.
    deadline = asyncio.get_running_loop().time() + 10
    while not await store.claim("batch_1", "000000", "b2", second):
        assert asyncio.get_running_loop().time() < deadline, "the dead holder's claim never expired"
        await asyncio.sleep(0.5)
    assert (await store.claims("batch_1"))["000000"].balancer == "b2"
    await store.release("batch_1", "000000", second)
    assert await store.claims("batch_1") == {}


async def test_mutate_retries_on_a_concurrent_change_and_can_decline(state):
    store = BatchStore(state)
    await store.create_batch(batch_pb2.Batch(id="batch_1", status=batch_pb2.BATCH_STATUS_IN_PROGRESS))

    async def bump(_: int) -> None:
        def change(b: batch_pb2.Batch) -> bool:
            b.request_counts.completed += 1
            return True
        await store.mutate("batch_1", change)

    await asyncio.gather(*(bump(i) for i in range(5)))
    stored = (await store.get_batch("batch_1")).value
    assert stored.request_counts.completed == 5
    unchanged = await store.mutate("batch_1", lambda b: False)
    assert unchanged.request_counts.completed == 5
