"""The reconciler with real parts: etcd, storage services as nodes, runtime processes with the real model."""

from __future__ import annotations


import grpc
import pytest

from clowder.controller.v1 import resources_pb2
from clowder.runtime.v1 import runtime_pb2
from clowder.storage.v1 import storage_pb2, storage_pb2_grpc
from clowder_common.auth import bearer_metadata
from clowder_common import keys
from clowder_common.processes import pid_alive
from clowder_controller.app import create_controller
from clowder_storage.app import create_storage
from helpers.configs import controller_config, storage_config
from helpers.wait import wait_for

pytestmark = pytest.mark.processes

TOKEN = "reconcile-test-token"
READY = resources_pb2.REPLICA_STATE_READY


async def start_node(etcd, prefix, tmp_path, name):
    config = storage_config(etcd.endpoint, prefix, tmp_path / name, name, lease_ttl_s=2)
    app = await create_storage(config, TOKEN)
    await app.start()
    return app


async def storage_call(node, method: str, request):
    async with grpc.aio.insecure_channel(f"127.0.0.1:{node.port}") as channel:
        stub = storage_pb2_grpc.StorageServiceStub(channel)
        return await getattr(stub, method)(request, metadata=bearer_metadata(TOKEN), timeout=10)


async def test_replicas_follow_deployments_and_nodes(etcd, etcd_prefix, state, tmp_path, model_path):
    node1 = await start_node(etcd, etcd_prefix, tmp_path, "n1")
    config = controller_config(etcd.endpoint, etcd_prefix, tmp_path / "controller", runtime_threads=1,
                               runtime_stop_grace_s=5, node_lost_grace_s=1.0)
    controller = await create_controller(config, TOKEN)
    await controller.start()
    node2 = None
    try:
        await state.put(state.key(keys.image("smol")),
                        resources_pb2.Image(alias="smol", source_url=model_path.as_uri()))
        await state.put(state.key(keys.deployment("smol")),
                        resources_pb2.Deployment(name="smol", image="smol", replicas=2))

        async def replicas():
            items, _ = await state.list(state.key(keys.replicas_of("smol")), resources_pb2.Replica)
            return [i.value for i in items]

        async def all_ready(count: int):
            current = await replicas()
            return current if len(current) == count and all(r.state == READY for r in current) else None

        ready = await wait_for(lambda: all_ready(2), 120, "2 ready replicas")
        assert {r.node for r in ready} == {"n1"}
        assert all(pid_alive(r.pid) for r in ready)
        endpoints, _ = await state.list(state.key(keys.endpoints_of("smol")), runtime_pb2.Endpoint)
        assert sorted(e.value.address for e in endpoints) == sorted(r.endpoint for r in ready)
        image = await state.get(state.key(keys.image("smol")), resources_pb2.Image)
        assert image.value.digest.startswith("sha256:") and all(r.image_digest == image.value.digest for r in ready)
        # The node stores the aimage as an OCI manifest over the model layer, pinned while runtimes use it.
        stored = await storage_call(node1, "ListImages", storage_pb2.ListImagesRequest())
        assert [(i.name, [layer.digest for layer in i.layers]) for i in stored.images] == [
            ("smol", [image.value.digest])]
        stats = await storage_call(node1, "GetStoreStats", storage_pb2.GetStoreStatsRequest())
        assert stats.pinned_bytes >= image.value.size_bytes > 0

        # Scale down: one replica and its process go away.
        await state.put(state.key(keys.deployment("smol")),
                        resources_pb2.Deployment(name="smol", image="smol", replicas=1))
        remaining = await wait_for(lambda: all_ready(1), 60, "scale down to 1")
        gone = [r for r in ready if r.id != remaining[0].id]
        await wait_for(lambda: not any(pid_alive(r.pid) for r in gone), 20, "stopped runtime to exit")

        # The node disappears (its lease is revoked): the replica is stopped and waits for a node.
        survivor = remaining[0]
        await node1.stop()

        async def pending():
            current = await replicas()
            return current if current and current[0].state == resources_pb2.REPLICA_STATE_PENDING else None

        waiting = await wait_for(pending, 30, "replica back to pending")
        assert waiting[0].node == "" and "storage node" in waiting[0].message
        await wait_for(lambda: not pid_alive(survivor.pid), 20, "runtime of the lost node to stop")

        # A new node appears: the replica is placed there, pulled and served again.
        node2 = await start_node(etcd, etcd_prefix, tmp_path, "n2")
        moved = await wait_for(lambda: all_ready(1), 120, "replica ready on the new node")
        assert moved[0].node == "n2" and moved[0].id == survivor.id

        # Deleting the deployment removes its replicas and their processes.
        await state.delete(state.key(keys.deployment("smol")))
        await wait_for(lambda: _async_not(replicas), 60, "replicas removed")
        assert not pid_alive(moved[0].pid)
        stats = await storage_call(node2, "GetStoreStats", storage_pb2.GetStoreStatsRequest())
        assert stats.pinned_bytes == 0  # the removed replica's pin is released
    finally:
        await controller.stop()
        if node2 is not None:
            await node2.stop()
        await node1.stop()


async def _async_not(fetch):
    return not await fetch()
