"""Limits through two real balancers on an etcd of this module's own (so it can be paused): the rate-limit stage
counts across both; while etcd is paused each balancer counts a key's limit on its own and keeps serving,
and the usage it counted meanwhile reaches etcd when etcd answers again."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal

import aiohttp
import pytest

from clowder.balancer.v1 import apikeys_pb2
from clowder.controller.v1 import resources_pb2
from clowder_common import keys
from clowder_common.etcd import EtcdState
from clowder_common.etcd_server import start_etcd

from clowder_balancer.app import create_balancer

from tenancy_helpers import ADMIN
from helpers.configs import balancer_config
from helpers.records import put_deployment
from helpers.runtimes import runtime_processes
from helpers.wait import wait_for

pytestmark = pytest.mark.processes

MODEL = "o"
STAGE_RPM = 6


@pytest.fixture(scope="module")
def own_etcd(tmp_path_factory):
    """An etcd of this module's own: pausing the session's would stall every other test's state."""
    work = tmp_path_factory.mktemp("etcd")
    etcd = start_etcd(work / "etcd", log_path=work / "etcd.log")
    yield etcd
    with contextlib.suppress(ProcessLookupError):
        os.kill(etcd.proc.pid, signal.SIGCONT)
    etcd.stop()


@pytest.fixture(scope="module")
async def cluster(own_etcd, model_path, tmp_path_factory):
    state = EtcdState([own_etcd.endpoint], "/tenancy-outage/")
    await state.connect()
    await put_deployment(state, MODEL)
    configuration = resources_pb2.ImageConfiguration()
    configuration.middleware.add(name="rate-limit").options.update({"requests_per_minute": STAGE_RPM})
    await state.put(state.key(keys.image(MODEL)),
                    resources_pb2.Image(alias=MODEL, source_url="file:///x", configuration=configuration))
    work = tmp_path_factory.mktemp("runtime")
    async with runtime_processes(state, own_etcd.endpoint, MODEL, ["r1"], model_path, work):
        apps = []
        for name in ("b1", "b2"):
            # Local counting lasts the whole pause once it begins (the test counts what each balancer admits).
            app = await create_balancer(
                balancer_config(own_etcd.endpoint, state.prefix, name=name, ready_timeout_s=5, endpoint_grace_s=60,
                                quota_etcd_timeout_s=0.5, quota_local_fallback_s=60, usage_flush_interval_s=0.3,
                                controller_address=""), admin_token=ADMIN)
            await app.start()
            apps.append(app)
        try:
            for app in apps:
                await wait_for(lambda a=app: len(a.discovery.endpoints(MODEL)) == 1, timeout=20, what="endpoint")
                await wait_for(lambda a=app: a.discovery.image_configuration(MODEL) == configuration,
                                 what="the image's middleware")
            yield state, apps
        finally:
            for app in apps:
                await app.stop()
    await state.close()


async def _chat(http: aiohttp.ClientSession, app, secret: str = "") -> tuple[int, dict]:
    headers = {"Authorization": f"Bearer {secret}"} if secret else {}
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1}
    async with http.post(f"http://127.0.0.1:{app.http_port}/v1/chat/completions", json=body,
                         headers=headers) as response:
        return response.status, await response.json()


async def test_the_rate_limit_stage_counts_across_both_balancers(cluster):
    _, apps = cluster
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as http:
        results = await asyncio.gather(*(_chat(http, apps[i % 2]) for i in range(2 * STAGE_RPM)))
    statuses = [status for status, _ in results]
    assert statuses.count(200) == STAGE_RPM and statuses.count(429) == STAGE_RPM, statuses


async def test_while_etcd_is_paused_limits_count_locally_and_usage_waits(cluster, own_etcd):
    state, apps = cluster
    record, secret = await apps[0].api_keys.create("outage", [], apikeys_pb2.KeyLimits(requests_per_minute=3))
    for app in apps:
        await wait_for(lambda a=app: a.api_keys.cache.items.get(a.api_keys._prefix + record.id) is not None,
                         what="the key everywhere")
    received = 0
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as http:
        os.kill(own_etcd.proc.pid, signal.SIGSTOP)
        try:
            per_balancer = []
            for app in apps:
                statuses = []
                for _ in range(5):
                    status, body = await _chat(http, app, secret)
                    statuses.append(status)
                    if status == 200:
                        received += body["usage"]["total_tokens"]
                per_balancer.append(statuses)
            # Each balancer alone holds the key to its limit: served, not stopped by the outage.
            assert per_balancer == [[200, 200, 200, 429, 429]] * 2
        finally:
            os.kill(own_etcd.proc.pid, signal.SIGCONT)

        async def usage() -> dict:
            async with http.get(f"http://127.0.0.1:{apps[0].http_port}/api/v1/usage", params={"key": record.id},
                                headers={"Authorization": f"Bearer {ADMIN}"}) as response:
                return await response.json() if response.status == 200 else {}

        async def flushed() -> bool:
            return int((await usage()).get("requests", 0)) == 6
        await wait_for(flushed, timeout=30, what="the usage counted during the pause flushed")
        assert int((await usage())["promptTokens"]) + int((await usage())["completionTokens"]) == received
