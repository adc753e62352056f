"""A runtime that dies is replaced at once (not at the next resync), and its dead address is never called ready."""

from __future__ import annotations

import os
import signal

import pytest

from clowder.controller.v1 import resources_pb2
from clowder_common import keys
from clowder_controller.app import create_controller
from controller_helpers import ReplicaHistory
from helpers.configs import controller_config
from helpers.wait import wait_for
from test_controller_reconcile import TOKEN, start_node

pytestmark = pytest.mark.processes

READY = resources_pb2.REPLICA_STATE_READY


async def test_a_killed_runtime_is_replaced_before_the_resync_and_never_ready_at_its_old_address(
        etcd, etcd_prefix, state, tmp_path, model_path):
    node = await start_node(etcd, etcd_prefix, tmp_path, "n1")
    # A resync far longer than the test's bound: only the exit watch can explain a quick restart.
    config = controller_config(etcd.endpoint, etcd_prefix, tmp_path / "controller", resync_interval_s=120,
                               runtime_threads=1, runtime_stop_grace_s=5)
    controller = await create_controller(config, TOKEN)
    await controller.start()
    key = state.key(keys.replicas_of("smol"))
    history: ReplicaHistory | None = None
    try:
        await state.put(state.key(keys.image("smol")),
                        resources_pb2.Image(alias="smol", source_url=model_path.as_uri()))
        await state.put(state.key(keys.deployment("smol")),
                        resources_pb2.Deployment(name="smol", image="smol", replicas=1))

        async def ready_replica():
            items, revision = await state.list(key, resources_pb2.Replica)
            return (items[0].value, revision) if len(items) == 1 and items[0].value.state == READY else None

        old, revision = await wait_for(ready_replica, 120, "a ready replica")
        history = ReplicaHistory(state, key, revision + 1)
        history.start()
        os.kill(old.pid, signal.SIGKILL)

        async def restarted():
            found = await state.get(state.key(keys.replica("smol", old.id)), resources_pb2.Replica)
            return found is not None and found.value.pid != old.pid and found.value.restarts == old.restarts + 1

        # Faster than the dead runtime's endpoint lease (5 s, refreshed every 1.7 s) can expire and wake a pass.
        await wait_for(restarted, 3.0, "the replica restarted before its endpoint lease could expire")
        new, _ = await wait_for(ready_replica, 120, "the replacement ready")
        assert new.endpoint != old.endpoint

        # etcd's record of every write since the kill: none is READY at the dead runtime's address.
        await history.caught_up()
        written = [value for _, _, value in history.events if value is not None]
        assert written, "no write recorded after the kill"
        assert not [r for r in written if r.state == READY and r.endpoint == old.endpoint]
    finally:
        if history is not None:
            await history.stop()
        await controller.stop()
        await node.stop()
