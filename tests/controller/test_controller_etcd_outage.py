"""etcd outages do not reach the data plane: a real controller, storage node and runtimes through an etcd
paused for 20 s and an etcd restarted with its data kept. Nothing restarts, nothing is requeued, all
re-registers, and the runtimes serve throughout.

Default lease TTLs and grace everywhere (storage 10 s, runtime endpoint 5 s, leader 10 s, node_lost_grace_s
30 s): the pause outlasts every lease, which is the case that used to restart the replicas.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time

import grpc
import pytest

from clowder.controller.v1 import resources_pb2
from clowder.runtime.v1 import runtime_pb2, runtime_pb2_grpc
from clowder_common import keys
from clowder_common.auth import bearer_metadata
from clowder_common.errors import Unavailable
from clowder_common.etcd import EtcdState
from clowder_common.etcd_server import start_etcd
from clowder_common.processes import pid_alive, terminate
from clowder_controller.leader import current_leader

from controller_helpers import ReplicaHistory, start_controller_process, start_storage_process
from helpers.wait import wait_for

pytestmark = pytest.mark.processes

TOKEN = "outage-test-token"
READY = resources_pb2.REPLICA_STATE_READY
PAUSE_S = 20


async def generate(address: str) -> str:
    """One short completion straight from a runtime (what a balancer would send)."""
    async with grpc.aio.insecure_channel(address) as channel:
        call = runtime_pb2_grpc.RuntimeServiceStub(channel).Generate(
            runtime_pb2.GenerateRequest(request_id="outage", prompt="The sky is",
                                        sampling=runtime_pb2.SamplingParams(temperature=0, max_tokens=4)),
            metadata=bearer_metadata(TOKEN), timeout=30)
        return "".join([r.text async for r in call])


async def test_etcd_pause_and_restart_leave_replicas_running(tmp_path, model_path):
    etcd = start_etcd(tmp_path / "etcd", log_path=tmp_path / "etcd.log")
    prefix = "/outage/"
    state = EtcdState([etcd.endpoint], prefix)
    await state.connect()
    node = start_storage_process(etcd.endpoint, prefix, tmp_path, "n1", TOKEN)
    controller, _ = start_controller_process(etcd.endpoint, prefix, tmp_path, "controller", TOKEN,
                                             {"CLOWDER_RESYNC_INTERVAL_S": "0.5", "CLOWDER_RUNTIME_THREADS": "1",
                                              "CLOWDER_RUNTIME_STOP_GRACE_S": "5"})
    history = None
    pids: list[int] = []
    try:
        await state.put(state.key(keys.image("smol")),
                        resources_pb2.Image(alias="smol", source_url=model_path.as_uri()))
        await state.put(state.key(keys.deployment("smol")),
                        resources_pb2.Deployment(name="smol", image="smol", replicas=2))

        async def replicas() -> dict[str, resources_pb2.Replica]:
            items, _ = await state.list(state.key(keys.replicas_of("smol")), resources_pb2.Replica)
            return {i.value.id: i.value for i in items}

        async def registered() -> tuple[set[str], set[str]]:
            nodes, _ = await state.list(state.key(keys.NODES), resources_pb2.Node)
            endpoints, _ = await state.list(state.key(keys.endpoints_of("smol")), runtime_pb2.Endpoint)
            return {n.value.name for n in nodes}, {e.value.address for e in endpoints}

        async def all_ready():
            current = await replicas()
            return current if len(current) == 2 and all(r.state == READY for r in current.values()) else None

        before = await wait_for(all_ready, 240, "two ready replicas")
        pids = [r.pid for r in before.values()]
        assert all(pid_alive(p) for p in pids) and all(r.restarts == 0 for r in before.values())
        _, revision = await state.list(state.key(keys.REPLICAS), resources_pb2.Replica)
        history = ReplicaHistory(state, state.key(keys.replicas_of("smol")), revision + 1)
        history.start()

        async def recovered(what: str) -> None:
            """Everything is back as it was: node and endpoints registered, same replicas, same processes."""
            async def back():
                try:
                    current = await all_ready()
                    nodes, addresses = await registered()
                    leader = await current_leader(state)
                except Unavailable:  # this test's own client reconnecting to the etcd that came back
                    return False
                return current is not None and nodes == {"n1"} and addresses == {
                    r.endpoint for r in before.values()} and leader is not None

            await wait_for(back, 60, f"the cluster to converge after {what}")
            after = await replicas()
            for rid, was in before.items():
                now = after[rid]
                assert (now.node, now.pid, now.endpoint, now.restarts) == (was.node, was.pid, was.endpoint, 0), \
                    f"{rid} changed across {what}: {was} -> {now}"
            assert all(pid_alive(p) for p in pids)
            # etcd's own record of every replica write since the fault: never requeued, moved or restarted.
            await history.caught_up()
            for revision, key, value in history.events:
                assert value is not None, f"{key} was deleted (revision {revision})"
                assert value.node == "n1" and value.pid in pids and value.restarts == 0, \
                    f"{key} at revision {revision} after {what}: {value}"
                assert value.state == READY, \
                    f"{key} went to {resources_pb2.ReplicaState.Name(value.state)} after {what}: {value.message}"

        # 1. etcd paused (SIGSTOP) for 20 s: every lease (node 10 s, endpoints 5 s, leader 10 s) expires.
        etcd.pause()
        paused = time.monotonic()
        try:
            # The data plane does not notice: both runtimes serve while etcd is stopped.
            for r in before.values():
                assert await generate(r.endpoint)
            await asyncio.sleep(max(0.0, PAUSE_S - (time.monotonic() - paused)))
            for r in before.values():
                assert await generate(r.endpoint)
        finally:
            etcd.resume()
        await recovered("a 20 s etcd pause")

        # 2. etcd restarted with its data kept (SIGTERM, down for 3 s, same data directory and ports).
        etcd.stop()
        for r in before.values():
            assert await generate(r.endpoint)
        await asyncio.sleep(3)
        etcd.restart()
        await recovered("an etcd restart")
        assert controller.poll() is None and node.poll() is None
    finally:
        if history is not None:
            await history.stop()
        etcd.resume()
        terminate(controller, 20)
        terminate(node, 10)
        for pid in pids:
            if pid_alive(pid):  # only after a failure: the controller stops its runtimes
                os.kill(pid, signal.SIGKILL)
        await state.close()
        etcd.stop()
