"""Fixtures the in-process balancer tests share: scripted runtimes, balancers on port 0, an HTTP client."""

from __future__ import annotations

import aiohttp
import pytest

from clowder_balancer.app import create_balancer

from balancer_helpers import ADMIN, ScriptedRuntime
from helpers.configs import balancer_config


@pytest.fixture
async def runtimes():
    started: list[ScriptedRuntime] = []

    async def make(behaviour, cls=ScriptedRuntime) -> ScriptedRuntime:
        runtime = await cls(behaviour).start()
        started.append(runtime)
        return runtime

    yield make
    for runtime in started:
        await runtime.stop()


@pytest.fixture
async def make_balancer(etcd, etcd_prefix, state):
    apps = []

    async def make(plugins=None, admin_token=ADMIN, **overrides):
        app = await create_balancer(balancer_config(etcd.endpoint, etcd_prefix, **overrides), plugins=plugins,
                                    admin_token=admin_token)
        await app.start()
        apps.append(app)
        return app

    yield make
    for app in apps:
        await app.stop()


@pytest.fixture
async def http():
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as session:
        yield session
