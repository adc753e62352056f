"""REST gateway fixtures: the real controller and a storage node in-process, the balancer's gateway (the bridge
and its hand-made routes) on an aiohttp port 0."""

from __future__ import annotations

import pathlib

import aiohttp
import pytest
from aiohttp import web

from clowder_balancer.gateway import CONTROLLER_SERVICES, RuntimeStatsApi, install_gateway
from clowder_controller.app import create_controller
from clowder_storage.app import create_storage

from helpers.configs import controller_config, storage_config
from rest_helpers import TOKEN


@pytest.fixture
async def controller(etcd, etcd_prefix, state, tmp_path: pathlib.Path):
    config = controller_config(etcd.endpoint, etcd_prefix, tmp_path / "controller", runtime_threads=1,
                               runtime_stop_grace_s=5)
    app = await create_controller(config, TOKEN)
    await app.start()
    yield app
    await app.stop()


@pytest.fixture
async def storage_node(etcd, etcd_prefix, state, tmp_path: pathlib.Path):
    config = storage_config(etcd.endpoint, etcd_prefix, tmp_path / "n1", "n1", lease_ttl_s=3, progress_interval_s=0.05)
    app = await create_storage(config, TOKEN)
    await app.start()
    yield app
    await app.stop()


@pytest.fixture
async def api(controller):
    """Base URL of an aiohttp server carrying only the gateway, pointed at the controller."""
    app = web.Application()
    # No balancer here: runtime-stats is served (and documented) but refuses every call without an admin token.
    install_gateway(app, {name: f"127.0.0.1:{controller.port}" for name in CONTROLLER_SERVICES},
                    runtime_stats=RuntimeStatsApi(discovery=None, channels=None, admin_token=None))
    runner = web.AppRunner(app, handler_cancellation=True)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    await runner.cleanup()


@pytest.fixture
async def http():
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
        yield session
