"""Priority on a full cluster, with a real storage node and real runtimes: the higher-priority deployment evicts
the lower one's replica, which waits with a reason."""

from __future__ import annotations

import asyncio

import pytest

from clowder.controller.v1 import resources_pb2
from clowder_common import keys
from clowder_controller.app import create_controller
from clowder_controller.events import read_events
from clowder_storage.app import create_storage

from helpers.configs import controller_config, storage_config
from helpers.wait import wait_for

pytestmark = pytest.mark.processes

TOKEN = "preemption-test-token"
STARTED = (resources_pb2.REPLICA_STATE_STARTING, resources_pb2.REPLICA_STATE_READY)


async def test_higher_priority_preempts_on_a_full_node(etcd, etcd_prefix, state, tmp_path, model_path):
    node = await create_storage(storage_config(etcd.endpoint, etcd_prefix, tmp_path / "n1", "n1", lease_ttl_s=2), TOKEN)
    await node.start()
    controller = await create_controller(controller_config(etcd.endpoint, etcd_prefix, tmp_path / "controller",
                                                           runtime_threads=1, runtime_stop_grace_s=3), TOKEN)
    await controller.start()
    try:
        registered = await state.get(state.key(keys.node("n1")), resources_pb2.Node)
        # Each replica claims 60% of the node's memory: one fits, two do not.
        claim = int(registered.value.memory_bytes * 0.6)
        await state.put(state.key(keys.image("smol")), resources_pb2.Image(alias="smol",
                                                                           source_url=model_path.as_uri()))

        async def replicas(name):
            items, _ = await state.list(state.key(keys.replicas_of(name)), resources_pb2.Replica)
            return [i.value for i in items]

        async def started(name):
            current = await replicas(name)
            return current if current and all(r.state in STARTED and r.node == "n1" for r in current) else None

        await state.put(state.key(keys.deployment("batch")), resources_pb2.Deployment(
            name="batch", image="smol", replicas=1, memory_bytes=claim, priority=0))
        low = (await wait_for(lambda: started("batch"), 60, "low-priority replica placed"))[0]

        # An equal-priority deployment waits: nothing is evicted for it.
        await state.put(state.key(keys.deployment("peer")), resources_pb2.Deployment(
            name="peer", image="smol", replicas=1, memory_bytes=claim, priority=0))

        async def peer_waits():
            current = await replicas("peer")
            return current and "0/1 nodes fit" in current[0].message

        await wait_for(peer_waits, 30, "equal priority to wait")
        assert (await started("batch"))[0].id == low.id
        await state.delete(state.key(keys.deployment("peer")))

        await state.put(state.key(keys.deployment("chat")), resources_pb2.Deployment(
            name="chat", image="smol", replicas=1, memory_bytes=claim, priority=10))
        await wait_for(lambda: started("chat"), 60, "high-priority replica placed")

        async def evicted():
            current = await replicas("batch")
            return current if current and current[0].state == resources_pb2.REPLICA_STATE_PENDING else None

        waiting = await wait_for(evicted, 30, "low-priority replica evicted")
        assert waiting[0].node == "" and waiting[0].id == low.id
        assert waiting[0].message == "preempted by chat (priority 10 > 0)" or "0/1 nodes fit" in \
            waiting[0].message

        async def says_why():
            current = await replicas("batch")
            return current and current[0].state == resources_pb2.REPLICA_STATE_PENDING and \
                "0/1 nodes fit" in current[0].message

        await wait_for(says_why, 30, "evicted replica to show why it waits")
        await controller.events.flush()
        events = await read_events(state, "batch")
        assert any(e.reason == "preempted" and "chat" in e.message for e in events)
        # It stays evicted: the high-priority replica keeps its place.
        await asyncio.sleep(1.5)
        assert (await started("chat")) and not await started("batch")
    finally:
        await controller.stop()
        await node.stop()
