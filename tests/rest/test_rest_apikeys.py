"""One bridge over services of two servers: the controller's and the balancer's ApiKeyService."""

from __future__ import annotations

import pytest
from aiohttp import web

import clowder.balancer.v1.apikeys_pb2  # noqa: F401  (registers ApiKeyService for the bridge)
from clowder_balancer.app import create_balancer
from clowder_balancer.gateway import CONTROLLER_SERVICES, install_gateway

from rest_helpers import TOKEN, call
from helpers.configs import balancer_config

pytestmark = pytest.mark.inprocess

API_KEYS = "clowder.balancer.v1.ApiKeyService"


@pytest.fixture
async def both(etcd, etcd_prefix, controller):
    balancer = await create_balancer(balancer_config(etcd.endpoint, etcd_prefix, drain_grace_s=1.0,
                                                     ready_timeout_s=60.0), admin_token=TOKEN)
    await balancer.start()
    app = web.Application()
    targets = {name: f"127.0.0.1:{controller.port}" for name in CONTROLLER_SERVICES}
    targets[API_KEYS] = f"127.0.0.1:{balancer.grpc_port}"
    install_gateway(app, targets)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    await runner.cleanup()
    await balancer.stop()


async def test_api_keys_through_the_bridge(both, http):
    api = both
    created = []
    for description in ("ci", "notebook", "batch"):
        status, body = await call(http, "POST", f"{api}/api/v1/apikeys",
                                  json={"description": description, "groups": ["team-a"]})
        assert status == 200, body
        assert body["key"].startswith("ck-") and body["apiKey"]["groups"] == ["team-a"]
        created.append(body["apiKey"]["id"])

    status, body = await call(http, "GET", f"{api}/api/v1/apikeys/{created[0]}")
    assert status == 200 and body["apiKey"]["description"] == "ci" and "key" not in body

    seen, token = [], ""
    while True:
        status, body = await call(http, "GET", f"{api}/api/v1/apikeys", params={"pageSize": "2", "pageToken": token})
        assert status == 200, body
        seen += [k["id"] for k in body["apiKeys"]]
        token = body["nextPageToken"]
        if not token:
            break
    assert seen == sorted(created)

    status, body = await call(http, "POST", f"{api}/api/v1/apikeys", json={"groups": ["Not A Group!"]})
    assert status == 400 and body["code"] == 3
    status, body = await call(http, "POST", f"{api}/api/v1/apikeys", auth=False, json={"description": "x"})
    assert status == 401
    status, body = await call(http, "DELETE", f"{api}/api/v1/apikeys/{created[1]}")
    assert status == 200 and body == {}
    status, body = await call(http, "GET", f"{api}/api/v1/apikeys/{created[1]}")
    assert status == 404 and body["code"] == 5

    # The controller's routes live on the same bridge.
    status, body = await call(http, "GET", f"{api}/api/v1/images")
    assert status == 200 and body["images"] == []
    async with http.get(f"{api}/api/v1/openapi.json") as response:
        document = await response.json()
    assert {"/api/v1/apikeys", "/api/v1/apikeys/{id}", "/api/v1/images"} <= set(document["paths"])
    assert document["paths"]["/api/v1/apikeys"]["post"]["operationId"] == "ApiKeyService_CreateApiKey"
