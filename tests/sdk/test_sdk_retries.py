"""Retries: idempotent calls ride out an UNAVAILABLE controller within their deadline; others fail at once."""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest

from clowder.client import AsyncClient, Client, Unavailable
from clowder_common.processes import free_port
from clowder_controller.app import create_controller

from sdk_helpers import TOKEN
from helpers.configs import controller_config

pytestmark = pytest.mark.inprocess


async def test_idempotent_calls_are_retried_until_the_controller_comes_up(etcd, tmp_path):
    port = free_port()
    address = f"127.0.0.1:{port}"
    prefix = f"/test-sdk-retry-{uuid.uuid4().hex[:8]}/"

    with Client(address, "127.0.0.1:1", admin_token=TOKEN, timeout_s=30, max_attempts=50) as client:
        started = time.monotonic()
        with pytest.raises(Unavailable):
            await asyncio.to_thread(client.images.create, "late", "file:///late.gguf")
        assert time.monotonic() - started < 5  # not retried: creating twice is not safe to assume

        listing = asyncio.create_task(asyncio.to_thread(client.nodes.list))
        await asyncio.sleep(1.0)
        assert not listing.done()  # still retrying, not failed
        controller = await create_controller(controller_config(etcd.endpoint, prefix, tmp_path, listen=address,
                                                               resync_interval_s=5.0), TOKEN)
        await controller.start()
        try:
            assert await asyncio.wait_for(listing, 30) == []
            async with AsyncClient(address, "127.0.0.1:1", admin_token=TOKEN) as aclient:
                assert [i async for i in aclient.images.list()] == []
        finally:
            await controller.stop()


async def test_retries_stop_at_the_deadline_with_the_real_error():
    address = f"127.0.0.1:{free_port()}"
    async with AsyncClient(address, "127.0.0.1:1", admin_token=TOKEN, timeout_s=1.5, max_attempts=100) as client:
        started = time.monotonic()
        with pytest.raises(Unavailable):
            await client.deployments.get("anything")
        assert 1.0 <= time.monotonic() - started < 2.5  # retried, but never past the deadline
