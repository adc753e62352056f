"""`clowder apikey create|ls|revoke` against an in-process balancer: the printed key works, then stops working."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest

from clowder_cli.main import main as clowder_main

from clowder_balancer.app import create_balancer

from balancer_helpers import ScriptedRuntime, speak
from helpers.configs import balancer_config
from helpers.records import put_deployment, put_endpoint
from helpers.wait import wait_for

pytestmark = pytest.mark.inprocess

ADMIN = "cli-admin-token"


async def test_cli_creates_lists_and_revokes_keys(etcd, etcd_prefix, state, monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("CLOWDER_ADMIN_TOKEN", ADMIN)
    runtime = await ScriptedRuntime(speak(["ok"])).start()
    app = await create_balancer(balancer_config(etcd.endpoint, etcd_prefix, require_api_keys=True), admin_token=ADMIN)
    await app.start()
    base = ["--data-dir", str(tmp_path), "apikey", "--balancer", f"127.0.0.1:{app.grpc_port}"]
    try:
        await put_deployment(state, "d")
        await put_endpoint(state, "d", "r0", runtime.address)
        await wait_for(lambda: app.discovery.endpoints("d"), what="endpoint")
        # The CLI is synchronous: run it off the loop the balancer serves on.
        assert await asyncio.to_thread(clowder_main, [*base, "create", "--group", "team", "--description", "ci"]) == 0
        key = capsys.readouterr().out.strip().splitlines()[-1]
        assert key.startswith("ck-")
        key_id = key.split("-")[1]
        await wait_for(lambda: len(app.api_keys.cache.items) == 1, what="key cache")
        url = f"http://127.0.0.1:{app.http_port}/v1/chat/completions"
        body = {"model": "d", "messages": [{"role": "user", "content": "hi"}]}
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
            async with http.post(url, json=body, headers={"Authorization": f"Bearer {key}"}) as resp:
                assert resp.status == 200
            assert await asyncio.to_thread(clowder_main, [*base, "ls"]) == 0
            listing = capsys.readouterr().out
            assert key_id in listing and "team" in listing and key not in listing
            assert await asyncio.to_thread(clowder_main, [*base, "revoke", key_id]) == 0
            await wait_for(lambda: not app.api_keys.cache.items, what="revocation")
            async with http.post(url, json=body, headers={"Authorization": f"Bearer {key}"}) as resp:
                assert resp.status == 401
        assert await asyncio.to_thread(clowder_main, [*base, "revoke", key_id]) == 1  # NOT_FOUND, said plainly
        assert "does not exist" in capsys.readouterr().out
    finally:
        await app.stop()
        await runtime.stop()
