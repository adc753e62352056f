"""The balancer sends an adapter's requests only to the replicas that hold it, as they load and unload it."""

from __future__ import annotations

import asyncio

import aiohttp
import grpc
import pytest
from clowder.runtime.v1 import adapters_pb2, adapters_pb2_grpc, runtime_pb2, runtime_pb2_grpc
from helpers.configs import balancer_config
from helpers.records import put_deployment
from helpers.wait import wait_for
from runtime_lora import write_lora_adapter

from clowder_balancer.app import create_balancer
from clowder_runtime.app import create_runtime
from clowder_runtime.config import RuntimeConfig

pytestmark = pytest.mark.inprocess

DEPLOYMENT = "smol"
PROMPT = "The sky is"


@pytest.fixture
async def replicas(model_path, etcd, etcd_prefix, state):
    await put_deployment(state, DEPLOYMENT, replicas=2)
    apps = []
    for replica in ("r1", "r2"):
        app = await create_runtime(RuntimeConfig(
            model_path=str(model_path), threads=1, slots=2, context_size=512, adapter_unload_grace_s=0.5,
            etcd_endpoints=(etcd.endpoint,), etcd_prefix=etcd_prefix, deployment=DEPLOYMENT, replica_id=replica))
        await app.start()
        apps.append(app)
    yield apps
    for app in apps:
        await app.stop()


@pytest.fixture
async def balancer(etcd, etcd_prefix, replicas):
    app = await create_balancer(balancer_config(etcd.endpoint, etcd_prefix, ready_timeout_s=5))
    await app.start()
    await wait_for(lambda: len(app.discovery.endpoints(DEPLOYMENT)) == 2, what="both endpoints")
    yield app
    await app.stop()


async def requests_served(app) -> int:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
        stats = await runtime_pb2_grpc.RuntimeServiceStub(channel).GetStats(runtime_pb2.GetStatsRequest(), timeout=5)
    return stats.requests_total


async def adapter_call(app, method: str, request):
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
        return await getattr(adapters_pb2_grpc.AdapterServiceStub(channel), method)(request, timeout=60)


def holding(balancer) -> set[str]:
    """The replicas whose etcd endpoint, as this balancer has seen it, lists the adapter."""
    return {e.replica_id for e in balancer.discovery.endpoints(DEPLOYMENT) if "pirate" in e.adapters}


async def test_adapter_requests_go_only_to_the_replicas_that_hold_it(balancer, replicas, tmp_path):
    holder, other = replicas[1], replicas[0]
    path = str(write_lora_adapter(tmp_path / "pirate.gguf"))
    url = f"http://127.0.0.1:{balancer.http_port}/v1/completions"
    body = {"model": DEPLOYMENT, "prompt": PROMPT, "max_tokens": 8, "temperature": 0, "adapter": "pirate"}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as http:
        async with http.post(url, json=body) as reply:
            # No replica has it yet.
            assert reply.status == 503 and "adapter 'pirate'" in (await reply.json())["error"]["message"]

        await adapter_call(holder, "LoadAdapter", adapters_pb2.LoadAdapterRequest(name="pirate", path=path))
        before = [await requests_served(a) for a in replicas]
        # Sent right after the load (the balancer waits a moment for an endpoint to list the adapter), and
        # together, so a load-only choice would spread them over both replicas.
        replies = await asyncio.gather(*(http.post(url, json=body) for _ in range(6)))
        for reply in replies:
            assert reply.status == 200, await reply.text()
            reply.release()
        after = [await requests_served(a) for a in replicas]
        assert after[1] - before[1] == 6 and after[0] == before[0]
        assert holding(balancer) == {"r2"}

        # Unloaded: the balancer stops routing it at once, and with no holder left says so.
        await adapter_call(holder, "UnloadAdapter", adapters_pb2.UnloadAdapterRequest(name="pirate"))
        async with http.post(url, json=body) as reply:
            assert reply.status == 503
        # The other replica takes it up once it loads it.
        await adapter_call(other, "LoadAdapter", adapters_pb2.LoadAdapterRequest(name="pirate", path=path))
        before = [await requests_served(a) for a in replicas]
        for _ in range(3):
            async with http.post(url, json=body) as reply:
                assert reply.status == 200, await reply.text()
        after = [await requests_served(a) for a in replicas]
        assert after[0] - before[0] == 3 and after[1] == before[1]
        assert holding(balancer) == {"r1"}
