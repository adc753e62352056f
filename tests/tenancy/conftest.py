"""Two real balancers on one etcd in front of one real runtime (the bundled model, two slots)."""

from __future__ import annotations

import uuid

import aiohttp
import pytest

from clowder.balancer.v1 import apikeys_pb2

from clowder_balancer.app import create_balancer

import tenancy_helpers as tenancy
from helpers.configs import balancer_config
from helpers.records import put_deployment
from helpers.runtimes import runtime_processes
from helpers.state import fresh_prefix, prefixed_state
from helpers.wait import wait_for


@pytest.fixture(scope="module")
async def cluster_state(etcd):
    async with prefixed_state(etcd.endpoint, fresh_prefix("test-tenancy")) as state:
        await put_deployment(state, tenancy.MODEL, replicas=1)
        yield state


@pytest.fixture(scope="module")
async def replica(etcd, cluster_state, model_path, tmp_path_factory):
    work = tmp_path_factory.mktemp("runtime")
    async with runtime_processes(cluster_state, etcd.endpoint, tenancy.MODEL, ["r1"], model_path, work,
                                 extra_args=["--slots", str(tenancy.SLOTS), "--context-size", "512"]) as started:
        yield started[0]


@pytest.fixture(scope="module")
async def balancers(etcd, cluster_state, replica):
    apps = []
    for name in ("b1", "b2"):
        app = await create_balancer(balancer_config(etcd.endpoint, cluster_state.prefix, name=name,
                                                    ready_timeout_s=10, stats_interval_s=0.2,
                                                    usage_flush_interval_s=0.3, controller_address=""),
                                    admin_token=tenancy.ADMIN)
        await app.start()
        apps.append(app)
    for app in apps:
        await wait_for(lambda a=app: len(a.discovery.endpoints(tenancy.MODEL)) == 1, timeout=20,
                         what="the endpoint")
        await wait_for(lambda a=app: a._model_slots(tenancy.MODEL) == tenancy.SLOTS, timeout=20,
                         what="the replica's slots")
    yield apps
    for app in apps:
        await app.stop()


@pytest.fixture(scope="module")
async def http():
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:
        yield session


@pytest.fixture
def make_key(balancers):
    """A new key with these limits, known to both balancers."""
    async def make(priority: int = 0, groups: tuple[str, ...] = ("team",), **limits) -> tuple[str, str]:
        record, secret = await balancers[0].api_keys.create(
            f"tenancy test {uuid.uuid4().hex[:6]}", list(groups), apikeys_pb2.KeyLimits(priority=priority, **limits))
        for app in balancers:
            await wait_for(lambda a=app: a.api_keys.cache.items.get(a.api_keys._prefix + record.id) is not None,
                             timeout=10, what="the key on every balancer")
        return record.id, secret
    return make
