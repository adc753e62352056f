"""A whole cluster in-process for the SDK tests: controller, one storage node, balancer, one real runtime of `smol`."""

from __future__ import annotations

import dataclasses

import pytest

from clowder.controller.v1 import resources_pb2
from clowder_common import keys
from clowder_common.etcd import EtcdState

from helpers.records import replicas_of
from helpers.services import services_in_process
from helpers.state import fresh_prefix, prefixed_state
from helpers.wait import wait_for
from sdk_helpers import MODEL, TOKEN


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
    async with prefixed_state(etcd.endpoint, fresh_prefix("test-sdk")) as state, \
            services_in_process(etcd.endpoint, state.prefix, work, TOKEN,
                                node=dict(lease_ttl_s=3, progress_interval_s=0.05),
                                controller=dict(runtime_threads=1, runtime_stop_grace_s=5),
                                balancer=dict(ready_timeout_s=5.0, drain_grace_s=2.0),
                                balancer_admin_token=TOKEN) as services:
        await state.put(state.key(keys.image(MODEL)), resources_pb2.Image(alias=MODEL, source_url=model_path.as_uri()))
        await state.put(state.key(keys.deployment(MODEL)), resources_pb2.Deployment(name=MODEL, image=MODEL, replicas=1))

        async def ready():
            return any(r.state == resources_pb2.REPLICA_STATE_READY for r in await replicas_of(state, MODEL))

        await wait_for(ready, 180, "the smol replica")
        yield Cluster(f"127.0.0.1:{services.controller.port}", f"127.0.0.1:{services.balancer.grpc_port}", "n1",
                      state)
