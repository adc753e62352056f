"""Several controllers: one leader reconciles; a killed leader is replaced and no replica is duplicated."""

from __future__ import annotations

import asyncio
import pathlib
import signal
import sys
import time

from clowder.controller.v1 import resources_pb2
from clowder_common import keys
from clowder_common.auth import TOKEN_ENV
from clowder_common.processes import async_wait_for_port, free_port, spawn, terminate
from clowder_controller.config import ControllerConfig
from clowder_controller.events import EventRecorder
from clowder_controller.launcher import LocalProcessLauncher
from clowder_controller.leader import current_leader
from clowder_controller.reconciler import Reconciler, replica_id, template_hash
from clowder_controller.storage_client import StorageClients

from controller_helpers import wait_for

TOKEN = "leader-test-token"
TTL = 2


def start_controller(etcd, prefix, tmp_path: pathlib.Path, name: str):
    port = free_port()
    log = open(tmp_path / f"{name}.log", "ab")
    proc = spawn([sys.executable, "-m", "clowder_controller", "--listen", f"127.0.0.1:{port}",
                  "--data-dir", str(tmp_path / name), "--etcd-endpoints", etcd.endpoint, "--etcd-prefix", prefix],
                 log, env={TOKEN_ENV: TOKEN, "CLOWDER_LEADER_TTL_S": str(TTL), "CLOWDER_RESYNC_INTERVAL_S": "0.5"})
    log.close()
    return proc, port


async def replica_ids(state, deployment):
    items, _ = await state.list(state.key(keys.replicas_of(deployment)), resources_pb2.Replica)
    return sorted(i.value.id for i in items)


async def test_killed_leader_is_replaced_without_duplicate_replicas(etcd, etcd_prefix, state, tmp_path):
    await state.put(state.key(keys.image("m")), resources_pb2.Image(alias="m", source_url="file:///nowhere.gguf"))
    deployment = resources_pb2.Deployment(name="d", image="m", replicas=3)
    await state.put(state.key(keys.deployment("d")), deployment)
    expected = [replica_id(template_hash(deployment), s) for s in range(3)]

    first, first_port = start_controller(etcd, etcd_prefix, tmp_path, "c1")
    second, second_port = start_controller(etcd, etcd_prefix, tmp_path, "c2")
    try:
        await async_wait_for_port("127.0.0.1", first_port, 60)
        await async_wait_for_port("127.0.0.1", second_port, 60)
        leader = await wait_for(lambda: current_leader(state), 30, "a leader")
        by_port = {f"127.0.0.1:{first_port}": (first, second, second_port),
                   f"127.0.0.1:{second_port}": (second, first, first_port)}
        leading, standby, standby_port = by_port[leader.address]

        # No node is registered: the replicas wait, each with its reason, and exactly three exist.
        async def three_pending():
            items, _ = await state.list(state.key(keys.replicas_of("d")), resources_pb2.Replica)
            return len(items) == 3 and all("storage node" in i.value.message for i in items)

        await wait_for(three_pending, 30, "three pending replicas")
        assert await replica_ids(state, "d") == expected

        leading.send_signal(signal.SIGKILL)
        leading.wait(10)
        killed_at = time.monotonic()

        async def standby_leads():
            current = await current_leader(state)
            return current is not None and current.address == f"127.0.0.1:{standby_port}"

        await wait_for(standby_leads, TTL + 10, "the standby to take over")
        assert time.monotonic() - killed_at < TTL + 5

        # The new leader reconciles: scaling to 5 adds exactly slots 3 and 4.
        deployment.replicas = 5
        await state.put(state.key(keys.deployment("d")), deployment)
        five = [replica_id(template_hash(deployment), s) for s in range(5)]

        async def five_exist():
            return await replica_ids(state, "d") == five

        await wait_for(five_exist, 20, "five replicas")
        await asyncio.sleep(1.5)  # a few more passes of the new leader
        assert await replica_ids(state, "d") == five
        assert standby.poll() is None
    finally:
        for proc in (first, second):
            if proc.poll() is None:
                terminate(proc, 10)


async def test_two_reconcilers_at_once_never_duplicate(etcd, state, tmp_path):
    """Safe to run twice: two reconcilers on the same state (a split brain) still make exactly N replicas."""
    config = ControllerConfig(etcd_endpoints=(etcd.endpoint,), etcd_prefix=state.prefix, resync_interval_s=0.2,
                              data_dir=str(tmp_path))
    await state.put(state.key(keys.image("m")), resources_pb2.Image(alias="m", source_url="file:///nowhere.gguf"))
    reconcilers = []
    for i in range(2):
        launcher = LocalProcessLauncher((etcd.endpoint,), state.prefix, "127.0.0.1:0", tmp_path / f"l{i}", TOKEN)
        reconcilers.append(Reconciler(state, StorageClients(TOKEN), launcher, config, EventRecorder(state)))
    for reconciler in reconcilers:
        await reconciler.start()
    try:
        for count in (4, 7, 2):
            deployment = resources_pb2.Deployment(name="d", image="m", replicas=count)
            await state.put(state.key(keys.deployment("d")), deployment)
            wanted = [replica_id(template_hash(deployment), s) for s in range(count)]

            async def exact():
                await asyncio.gather(*(r.reconcile_once() for r in reconcilers))
                return await replica_ids(state, "d") == sorted(wanted)

            await wait_for(exact, 20, f"{count} replicas")
            await asyncio.sleep(0.6)
            assert await replica_ids(state, "d") == sorted(wanted)
    finally:
        for reconciler in reconcilers:
            await reconciler.stop()
