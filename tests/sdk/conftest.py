"""A whole cluster in-process for the SDK tests: controller, one storage node, balancer, one real runtime of `smol`."""

from __future__ import annotations

import dataclasses
import uuid

import pytest

from clowder.controller.v1 import resources_pb2
from clowder_common import keys
from clowder_common.etcd import EtcdState
from clowder_controller.app import create_controller
from clowder_storage.app import create_storage
from clowder_balancer.app import create_balancer

from sdk_helpers import MODEL, TOKEN
from helpers.wait import wait_for
from helpers.configs import balancer_config, controller_config, storage_config


@dataclasses.dataclass
class Cluster:
    controller: str
    balancer: str
    node: str
    state: EtcdState


@pytest.fixture(scope="module")
async def cluster(etcd, model_path, tmp_path_factory):
    """`smol` (the bundled model) is pulled, deployed with one replica and ready before the tests start."""
    work = tmp_path_factory.mktemp("sdk")
    prefix = f"/test-sdk-{uuid.uuid4().hex[:8]}/"
    state = EtcdState([etcd.endpoint], prefix)
    await state.connect()
    storage = await create_storage(storage_config(etcd.endpoint, prefix, work / "n1", "n1", lease_ttl_s=3,
                                                  progress_interval_s=0.05), TOKEN)
    controller = await create_controller(controller_config(etcd.endpoint, prefix, work / "controller",
                                                           runtime_threads=1, runtime_stop_grace_s=5), TOKEN)
    balancer = await create_balancer(balancer_config(etcd.endpoint, prefix, ready_timeout_s=5.0, drain_grace_s=2.0),
                                     admin_token=TOKEN)
    started = []
    try:
        for app in (storage, controller, balancer):
            await app.start()
            started.append(app)
        await state.put(state.key(keys.image(MODEL)), resources_pb2.Image(alias=MODEL, source_url=model_path.as_uri()))
        await state.put(state.key(keys.deployment(MODEL)), resources_pb2.Deployment(name=MODEL, image=MODEL, replicas=1))

        async def ready():
            items, _ = await state.list(state.key(keys.replicas_of(MODEL)), resources_pb2.Replica)
            return any(i.value.state == resources_pb2.REPLICA_STATE_READY for i in items)

        await wait_for(ready, 180, "the smol replica")
        yield Cluster(f"127.0.0.1:{controller.port}", f"127.0.0.1:{balancer.grpc_port}", "n1", state)
    finally:
        for app in reversed(started):
            await app.stop()
        await state.delete_prefix(prefix)
        await state.close()
