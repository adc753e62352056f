"""`clowder describe` and `clowder ps` show a deployment's replicas and events from a running controller."""

from __future__ import annotations

import asyncio
import time

import pytest

from clowder.controller.v1 import resources_pb2
from clowder_cli.main import main as clowder
from clowder_common import keys
from clowder_common.auth import TOKEN_ENV
from clowder_controller.app import create_controller
from helpers.configs import controller_config

pytestmark = pytest.mark.inprocess

TOKEN = "describe-test-token"


async def test_describe_and_ps_show_pending_reason_and_events(etcd, etcd_prefix, state, tmp_path, capsys,
                                                              monkeypatch):
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    monkeypatch.setenv("COLUMNS", "300")  # rich would wrap the table cells otherwise
    config = controller_config(etcd.endpoint, etcd_prefix, tmp_path)
    controller = await create_controller(config, TOKEN)
    await controller.start()
    try:
        await state.put(state.key(keys.image("m")), resources_pb2.Image(alias="m", source_url="file:///x.gguf"))
        # A node in zone b only: a zone=a deployment cannot be placed, and says why.
        lease = await state.grant_lease(30)
        await state.put(state.key(keys.node("nb")), resources_pb2.Node(name="nb", labels={"zone": "b"},
                                                                       storage_address="127.0.0.1:1"), lease=lease)
        await state.put(state.key(keys.deployment("web")), resources_pb2.Deployment(
            name="web", image="m", replicas=1, node_selector={"zone": "a"}, max_replicas=3, min_replicas=1))
        address = f"127.0.0.1:{controller.port}"
        loop = asyncio.get_running_loop()
        deadline = time.monotonic() + 30
        while True:
            capsys.readouterr()
            code = await loop.run_in_executor(None, clowder, ["--controller", address, "describe", "web"])
            out = capsys.readouterr().out
            if "unschedulable" in out or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.3)
        assert code == 0
        assert "0/1 nodes fit: 1 without labels zone=a" in out
        assert "autoscaling 1..3 replicas" in out and "placement: zone=a" in out
        assert "unschedulable" in out and "pending" in out

        code = await loop.run_in_executor(None, clowder, ["--controller", address, "ps"])
        out = capsys.readouterr().out
        assert code == 0 and "LAST EVENT" in out and "unschedulable" in out

        code = await loop.run_in_executor(None, clowder, ["--controller", address, "describe", "nope"])
        assert code == 1 and "NOT_FOUND" in capsys.readouterr().out
        await state.revoke_lease(lease)
    finally:
        await controller.stop()
