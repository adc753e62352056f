"""Placement with real storage nodes: labels, memory, spread, pending reasons, and a node lost by lease expiry."""

from __future__ import annotations

import asyncio
import signal
import sys
import time

import pytest

from clowder.controller.v1 import controller_pb2, controller_pb2_grpc, resources_pb2
from clowder_common import keys
from clowder_common.auth import TOKEN_ENV, bearer_metadata
from clowder_common.clients import aio_channel
from clowder_common.processes import free_port, spawn, terminate
from clowder_controller.app import create_controller
from clowder_storage.app import create_storage

from helpers.configs import controller_config, storage_config
from helpers.wait import wait_for

pytestmark = pytest.mark.processes

TOKEN = "placement-test-token"
LEASE_TTL = 2
# Short, so the test is quick; the default (30 s) is the same code path with a longer wait.
LOST_GRACE = 3.0
STARTED = (resources_pb2.REPLICA_STATE_STARTING, resources_pb2.REPLICA_STATE_READY)


async def start_node(etcd, prefix, tmp_path, name, labels):
    config = storage_config(etcd.endpoint, prefix, tmp_path / name, name, labels=labels, lease_ttl_s=LEASE_TTL)
    app = await create_storage(config, TOKEN)
    await app.start()
    return app


def start_node_process(etcd, prefix, tmp_path, name, labels):
    """A storage node as its own process, so it can die without revoking its lease."""
    argv = [sys.executable, "-m", "clowder_storage", "--listen", f"127.0.0.1:{free_port()}", "--data-dir",
            str(tmp_path / name), "--node-name", name, "--etcd-endpoints", etcd.endpoint, "--etcd-prefix", prefix,
            "--lease-ttl-s", str(LEASE_TTL)]
    for k, v in labels.items():
        argv += ["--label", f"{k}={v}"]
    with open(tmp_path / f"{name}.log", "ab") as log:
        return spawn(argv, log, env={TOKEN_ENV: TOKEN})


async def test_placement_follows_labels_memory_and_lost_nodes(etcd, etcd_prefix, state, tmp_path, model_path):
    n1 = await start_node(etcd, etcd_prefix, tmp_path, "n1", {"zone": "a"})
    n2 = await start_node(etcd, etcd_prefix, tmp_path, "n2", {"zone": "b"})
    n3 = start_node_process(etcd, etcd_prefix, tmp_path, "n3", {"zone": "a"})
    config = controller_config(etcd.endpoint, etcd_prefix, tmp_path / "controller", runtime_threads=1,
                               runtime_stop_grace_s=3, node_lost_grace_s=LOST_GRACE)
    controller = await create_controller(config, TOKEN)
    await controller.start()
    channel = aio_channel(f"127.0.0.1:{controller.port}")
    auth = bearer_metadata(TOKEN)
    images = controller_pb2_grpc.ImageServiceStub(channel)
    deployments = controller_pb2_grpc.DeploymentServiceStub(channel)

    async def replicas(name):
        reply = await deployments.ListReplicas(controller_pb2.ListReplicasRequest(deployment=name), metadata=auth)
        return list(reply.replicas)

    try:
        await wait_for(lambda: _nodes_are(state, {"n1", "n2", "n3"}), 60, "three nodes")
        created = await images.CreateImage(controller_pb2.CreateImageRequest(
            image=resources_pb2.Image(alias="smol", source_url=model_path.as_uri())), metadata=auth)
        # The controller read the GGUF metadata the memory estimate needs.
        assert created.image.model_shape.layers == 30 and created.image.model_shape.kv_heads == 3

        async def create(name, **fields):
            await deployments.CreateDeployment(controller_pb2.CreateDeploymentRequest(
                deployment=resources_pb2.Deployment(name=name, image="smol", **fields)), metadata=auth)

        await create("zoned", replicas=2, node_selector={"zone": "a"})
        await create("huge", replicas=1, memory_bytes=1 << 50)

        async def zoned_placed():
            current = await replicas("zoned")
            return current if len(current) == 2 and all(r.state in STARTED for r in current) else None

        placed = await wait_for(zoned_placed, 60, "zoned replicas placed")
        # Only zone=a nodes, and spread: one replica on each.
        assert sorted(r.node for r in placed) == ["n1", "n3"]

        async def huge_pending():
            current = await replicas("huge")
            return current if current and "0/3 nodes fit" in current[0].message else None

        pending = await wait_for(huge_pending, 30, "huge replica pending with a reason")
        assert pending[0].state == resources_pb2.REPLICA_STATE_PENDING and not pending[0].node
        assert "3 without 1048576.00 GiB of free memory" in pending[0].message

        # n3 dies without revoking its lease: once the lease expired (etcd answering all along) and the grace
        # period passed, its replica moves to n1 (zone a); not before.
        moved_id = next(r.id for r in placed if r.node == "n3")
        n3.send_signal(signal.SIGKILL)
        n3.wait(10)
        killed = time.monotonic()
        await wait_for(lambda: _nodes_are(state, {"n1", "n2"}), LEASE_TTL + 10, "n3's lease to expire")
        expired = time.monotonic()

        async def moved():
            current = {r.id: r for r in await replicas("zoned")}
            r = current.get(moved_id)
            return r if r is not None and r.node == "n1" and r.state in STARTED else None

        async def left_alone():
            # Still placed on n3 (its runtime may have failed with n3's storage; it is not moved yet).
            r = {r.id: r for r in await replicas("zoned")}[moved_id]
            return r.node == "n3" or (r.node, r.state, r.message)

        while time.monotonic() - expired < LOST_GRACE - 1.0:
            alone = await left_alone()
            assert alone is True, f"the replica moved before the grace period was over: {alone}"
            await asyncio.sleep(0.2)
        await wait_for(moved, 60, "replica moved off the lost node")
        assert time.monotonic() - killed < LEASE_TTL + LOST_GRACE + 15

        # The events tell the story, through the API.
        got = await deployments.GetDeployment(controller_pb2.GetDeploymentRequest(name="zoned"), metadata=auth)
        reasons = [e.reason for e in got.deployment.events]
        await wait_for(lambda: _has_event(deployments, auth, "zoned", "rescheduled"), 10, "rescheduled event")
        assert {"scheduled", "pulling", "started"} <= set(reasons)
        listed = await deployments.ListDeployments(controller_pb2.ListDeploymentsRequest(), metadata=auth)
        assert all(len(d.events) == 1 for d in listed.deployments)
        huge = next(d for d in listed.deployments if d.name == "huge")
        assert huge.events[0].reason == "unschedulable"
    finally:
        await channel.close()
        await controller.stop()
        if n3.poll() is None:
            terminate(n3, 5)
        await n2.stop()
        await n1.stop()


async def _nodes_are(state, names):
    items, _ = await state.list(state.key(keys.NODES), resources_pb2.Node)
    return {i.value.name for i in items} == names


async def _has_event(deployments, auth, name, reason):
    got = await deployments.GetDeployment(controller_pb2.GetDeploymentRequest(name=name), metadata=auth)
    return any(e.reason == reason for e in got.deployment.events)
