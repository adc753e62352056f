"""Rolling update with real runtimes: a new image's replica is ready before the old one stops."""

from __future__ import annotations

import asyncio
import time

import pytest

from clowder.controller.v1 import resources_pb2
from clowder_common import keys
from clowder_common.processes import pid_alive
from clowder_controller.app import create_controller
from clowder_controller.events import read_events
from clowder_controller.reconciler import template_hash
from clowder_storage.app import create_storage
from helpers.configs import controller_config, storage_config

pytestmark = pytest.mark.processes

TOKEN = "rolling-test-token"
READY = resources_pb2.REPLICA_STATE_READY


async def test_image_change_rolls_replicas_without_losing_service(etcd, etcd_prefix, state, tmp_path, model_path):
    node = await create_storage(storage_config(etcd.endpoint, etcd_prefix, tmp_path / "n1", "n1", lease_ttl_s=2), TOKEN)
    await node.start()
    config = controller_config(etcd.endpoint, etcd_prefix, tmp_path / "controller", runtime_threads=1,
                               runtime_stop_grace_s=5)
    controller = await create_controller(config, TOKEN)
    await controller.start()
    try:
        for alias, prompt in (("v1", "You are v1."), ("v2", "You are v2.")):
            await state.put(state.key(keys.image(alias)), resources_pb2.Image(
                alias=alias, source_url=model_path.as_uri(),
                configuration=resources_pb2.ImageConfiguration(system_prompt=prompt)))
        deployment = resources_pb2.Deployment(name="chat", image="v1", replicas=1)
        await state.put(state.key(keys.deployment("chat")), deployment)

        async def replicas():
            items, _ = await state.list(state.key(keys.replicas_of("chat")), resources_pb2.Replica)
            return [i.value for i in items]

        deadline = time.monotonic() + 120
        while not any(r.state == READY for r in await replicas()):
            assert time.monotonic() < deadline, "v1 never became ready"
            await asyncio.sleep(0.2)
        old = (await replicas())[0]

        deployment.image = "v2"
        await state.put(state.key(keys.deployment("chat")), deployment)
        new_template = template_hash(deployment)
        # Sample until only the new replica is left: at no point may the deployment have no ready replica.
        deadline = time.monotonic() + 120
        samples = 0
        while True:
            current = await replicas()
            samples += 1
            assert any(r.state == READY for r in current), f"no ready replica during the update: {current}"
            assert len(current) <= 2, "surge is one replica"
            if len(current) == 1 and current[0].template_hash == new_template and current[0].state == READY:
                break
            assert time.monotonic() < deadline, "the update did not finish"
            await asyncio.sleep(0.1)
        assert samples > 3 and current[0].id != old.id
        deadline = time.monotonic() + 20
        while pid_alive(old.pid):
            assert time.monotonic() < deadline, "the old runtime kept running"
            await asyncio.sleep(0.2)
        await controller.events.flush()
        events = [(e.reason, e.replica) for e in await read_events(state, "chat")]
        # The new replica was ready before the old one was stopped.
        assert events.index(("ready", current[0].id)) < events.index(("stopped", old.id))
    finally:
        await controller.stop()
        await node.stop()
