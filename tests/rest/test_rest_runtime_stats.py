"""The gateway's own route GET /api/v1/runtime-stats without a cluster: its admin-token answers, and its entry in
the gateway's OpenAPI document. (With a real runtime: tests/console/test_console.py::test_runtime_stats_route.)"""

from __future__ import annotations

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from clowder_balancer.apikeys import SERVICE_NAME as API_KEY_SERVICE
from clowder_balancer.gateway import RuntimeStatsApi, install_gateway

pytestmark = pytest.mark.inprocess

# Never dialled: these tests stop at the token check or read the document.
TARGETS = {API_KEY_SERVICE: "127.0.0.1:9"}


async def gateway_client(admin_token: str | None) -> TestClient:
    app = web.Application()
    # Discovery and channels are used only by a runtime-stats call that gets past the token check.
    install_gateway(app, TARGETS, runtime_stats=RuntimeStatsApi(discovery=None, channels=None,
                                                                admin_token=admin_token))
    return TestClient(TestServer(app))


@pytest.fixture
async def client():
    async with await gateway_client("the-admin-token") as client:
        yield client


async def test_runtime_stats_needs_the_admin_token(client):
    missing = await client.get("/api/v1/runtime-stats")
    assert missing.status == 401 and "missing bearer token" in (await missing.json())["message"]
    wrong = await client.get("/api/v1/runtime-stats", headers={"Authorization": "Bearer nope"})
    assert wrong.status == 401 and (await wrong.json())["message"] == "invalid bearer token"


async def test_runtime_stats_without_an_admin_token_is_refused():
    async with await gateway_client(None) as client:
        response = await client.get("/api/v1/runtime-stats", headers={"Authorization": "Bearer anything"})
        assert response.status == 400
        assert (await response.json())["details"][0]["reason"] == "NO_ADMIN_TOKEN"


async def test_runtime_stats_is_in_the_gateways_openapi_document(client):
    from openapi_spec_validator import validate

    response = await client.get("/api/v1/openapi.json")
    assert response.status == 200
    document = await response.json()
    validate(document)
    operation = document["paths"]["/api/v1/runtime-stats"]["get"]
    assert operation["operationId"] == "Balancer_GetRuntimeStats"
    assert [p["name"] for p in operation["parameters"]] == ["deployment"]
    replica = operation["responses"]["200"]["content"]["application/json"]["schema"]["properties"]["replicas"]
    assert {"deployment", "reachable", "kvCacheUsage", "generationTokensTotal"} <= set(replica["items"]["properties"])
    # Without the controller's services, the bridge serves the balancer's own and no /workers routes.
    assert "/api/v1/apikeys" in document["paths"] and "/api/v1/workers" not in document["paths"]
