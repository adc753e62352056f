"""Scale from zero through the real balancer: a held request activates the deployment and is served; idle
again, the deployment goes back to zero."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import pytest

from clowder.controller.v1 import resources_pb2
from clowder_common import keys
from clowder_common.processes import pid_alive
from helpers.records import replicas_of
from helpers.services import services_in_process

pytestmark = pytest.mark.processes

TOKEN = "activation-test-token"


async def test_request_wakes_a_deployment_at_zero_and_idle_returns_it_to_zero(etcd, etcd_prefix, state, tmp_path,
                                                                              model_path):
    async with services_in_process(etcd.endpoint, etcd_prefix, tmp_path, TOKEN, node=dict(lease_ttl_s=2),
                                   controller=dict(runtime_threads=1, runtime_stop_grace_s=3,
                                                   autoscale_interval_s=0.3, scale_down_window_s=1),
                                   balancer=dict(ready_timeout_s=120, drain_grace_s=3, name="b1",
                                                 load_report_interval_s=0.3)) as services:
        balancer = services.balancer
        await state.put(state.key(keys.image("smol")), resources_pb2.Image(alias="smol",
                                                                           source_url=model_path.as_uri()))
        await state.put(state.key(keys.deployment("smol")), resources_pb2.Deployment(
            name="smol", image="smol", replicas=0, min_replicas=0, max_replicas=2, target_in_flight=4,
            scale_to_zero_after_s=3))
        url = f"http://127.0.0.1:{balancer.http_port}/v1/chat/completions"
        body = {"model": "smol", "messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 4}
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=180)) as http:
            # The balancer learns deployments through its own watch: wait until it knows this one.
            deadline = time.monotonic() + 30
            while True:
                async with http.get(url.replace("chat/completions", "models/smol")) as resp:
                    if resp.status == 200:
                        break
                assert time.monotonic() < deadline, "the balancer never saw the deployment"
                await asyncio.sleep(0.1)
            assert await replicas_of(state, "smol") == []
            async with http.post(url, json=body) as resp:
                answer = await resp.json()
                assert resp.status == 200, answer
        assert answer["choices"][0]["message"]["content"]
        served_by = await replicas_of(state, "smol")
        assert len(served_by) == 1 and served_by[0].state == resources_pb2.REPLICA_STATE_READY

        # No more requests: after scale_to_zero_after_s the deployment returns to zero and its runtime stops.
        deadline = time.monotonic() + 60
        while await replicas_of(state, "smol") or (await _deployment(state)).replicas != 0:
            assert time.monotonic() < deadline, "did not scale back to zero"
            await asyncio.sleep(0.3)
        deadline = time.monotonic() + 20
        while pid_alive(served_by[0].pid):
            assert time.monotonic() < deadline, "the idle runtime kept running"
            await asyncio.sleep(0.2)




async def _deployment(state):
    return (await state.get(state.key(keys.deployment("smol")), resources_pb2.Deployment)).value
