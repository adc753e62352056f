"""Every annotated control-plane RPC through the REST bridge, against the real controller and storage."""

from __future__ import annotations

import hashlib
import json

import pytest

from clowder_balancer.gateway import CONTROLLER_SERVICES
from clowder_common.rest import resolve_services, routes_of

from rest_helpers import AUTH, call
from helpers.wait import wait_for

ERROR_INFO = "type.googleapis.com/google.rpc.ErrorInfo"
BAD_REQUEST = "type.googleapis.com/google.rpc.BadRequest"


def detail(body: dict, type_url: str) -> dict:
    found = [d for d in body["details"] if d["@type"] == type_url]
    assert found, f"no {type_url} in {body}"
    return found[0]


def image_body(alias: str, url: str = "file:///models/none.gguf") -> dict:
    return {"alias": alias, "sourceUrl": url}


@pytest.mark.inprocess
async def test_images_create_get_delete_and_their_errors(api, http):
    status, body = await call(http, "POST", f"{api}/api/v1/images", json=image_body("alpha"))
    assert status == 200, body
    assert body["image"]["alias"] == "alpha" and body["image"]["sourceUrl"] == "file:///models/none.gguf"
    # Fields without presence are printed too (grpc-gateway's default), 64-bit integers as strings.
    assert body["image"]["digest"] == "" and body["image"]["sizeBytes"] == "0"

    status, body = await call(http, "GET", f"{api}/api/v1/images/alpha")
    assert status == 200 and body["image"]["alias"] == "alpha"

    status, body = await call(http, "POST", f"{api}/api/v1/images", json=image_body("alpha"))
    assert status == 409 and body["code"] == 6  # ALREADY_EXISTS
    assert detail(body, ERROR_INFO)["domain"] == "clowder.dev"

    status, body = await call(http, "POST", f"{api}/api/v1/images", json=image_body("Not An Alias!"))
    assert status == 400 and body["code"] == 3
    assert any(v["field"].endswith("alias") for v in detail(body, BAD_REQUEST)["fieldViolations"])

    status, body = await call(http, "POST", f"{api}/api/v1/images", json=image_body("beta", "ftp://x/y.gguf"))
    assert status == 400 and "source_url" in json.dumps(detail(body, BAD_REQUEST))

    status, body = await call(http, "DELETE", f"{api}/api/v1/images/alpha")
    assert status == 200 and body == {}
    status, body = await call(http, "GET", f"{api}/api/v1/images/alpha")
    assert status == 404 and body["code"] == 5 and "alpha" in body["message"]
    assert detail(body, ERROR_INFO)["reason"]
    status, body = await call(http, "DELETE", f"{api}/api/v1/images/alpha")
    assert status == 404


@pytest.mark.inprocess
async def test_list_pages_with_page_token(api, http):
    aliases = [f"img-{i}" for i in range(5)]
    for alias in reversed(aliases):
        status, _ = await call(http, "POST", f"{api}/api/v1/images", json=image_body(alias))
        assert status == 200
    seen, token, pages = [], "", 0
    while True:
        status, body = await call(http, "GET", f"{api}/api/v1/images", params={"pageSize": "2", "pageToken": token})
        assert status == 200, body
        assert len(body["images"]) <= 2
        seen += [i["alias"] for i in body["images"]]
        token, pages = body["nextPageToken"], pages + 1
        if not token:
            break
    assert seen == aliases and pages == 3
    # Proto field names work as query parameters too, as in grpc-gateway.
    status, body = await call(http, "GET", f"{api}/api/v1/images", params={"page_size": "4"})
    assert [i["alias"] for i in body["images"]] == aliases[:4] and body["nextPageToken"]

    status, body = await call(http, "GET", f"{api}/api/v1/images", params={"pageToken": "%%%not-ours"})
    assert status == 400 and detail(body, BAD_REQUEST)["fieldViolations"][0]["field"] == "page_token"
    status, body = await call(http, "GET", f"{api}/api/v1/images", params={"pageSize": "many"})
    assert status == 400 and detail(body, BAD_REQUEST)["fieldViolations"][0]["field"] == "pageSize"
    status, body = await call(http, "GET", f"{api}/api/v1/images", params={"pageSize": "5000"})
    assert status == 400 and body["code"] == 3


@pytest.mark.inprocess
async def test_the_bearer_token_is_forwarded_and_checked(api, http):
    status, body = await call(http, "GET", f"{api}/api/v1/images", auth=False)
    assert status == 401 and body["code"] == 16
    status, body = await call(http, "GET", f"{api}/api/v1/images", auth=False,
                              headers={"Authorization": "Bearer wrong"})
    assert status == 401 and detail(body, ERROR_INFO)["reason"] == "INVALID_TOKEN"


async def create_deployment(api: str, http, name: str, image: str) -> dict:
    """An image `image` and a deployment `name` of it with no replicas, through the bridge: the deployment."""
    status, _ = await call(http, "POST", f"{api}/api/v1/images", json=image_body(image))
    assert status == 200
    status, body = await call(http, "POST", f"{api}/api/v1/deployments",
                              json={"name": name, "image": image, "replicas": 0})
    assert status == 200, body
    return body["deployment"]


@pytest.mark.inprocess
async def test_deployments_create_get_list_patch_replicas_delete(api, http):
    deployment = await create_deployment(api, http, "web", "smol")
    assert deployment["name"] == "web" and deployment["replicas"] == 0
    status, body = await call(http, "POST", f"{api}/api/v1/deployments",
                              json={"name": "web", "image": "smol", "replicas": 0})
    assert status == 409
    status, body = await call(http, "POST", f"{api}/api/v1/deployments",
                              json={"name": "other", "image": "missing", "replicas": 1})
    assert status == 404

    status, body = await call(http, "GET", f"{api}/api/v1/deployments/web")
    assert status == 200 and body["deployment"]["image"] == "smol"
    status, body = await call(http, "GET", f"{api}/api/v1/deployments")
    assert status == 200 and [d["name"] for d in body["deployments"]] == ["web"]

    # The path variable names the deployment; the body carries the new values.
    status, body = await call(http, "PATCH", f"{api}/api/v1/deployments/web", json={"replicas": 2})
    assert status == 200, body
    assert body["deployment"]["name"] == "web" and body["deployment"]["replicas"] == 2
    status, body = await call(http, "PATCH", f"{api}/api/v1/deployments/ghost", json={"replicas": 1})
    assert status == 404

    # No node is registered: the reconciler places two replicas that wait for one.
    async def pending():
        status, body = await call(http, "GET", f"{api}/api/v1/deployments/web/replicas")
        assert status == 200
        return body["replicas"] if len(body["replicas"]) == 2 else None

    replicas = await wait_for(pending, 30, "two replicas")
    assert {r["deployment"] for r in replicas} == {"web"}
    assert all(r["state"] == "REPLICA_STATE_PENDING" for r in replicas)
    status, body = await call(http, "GET", f"{api}/api/v1/deployments/-/replicas")
    assert status == 200 and len(body["replicas"]) == 2
    status, body = await call(http, "GET", f"{api}/api/v1/deployments/ghost/replicas")
    assert status == 404

    status, body = await call(http, "DELETE", f"{api}/api/v1/images/smol")
    assert status == 400 and body["code"] == 9  # FAILED_PRECONDITION: still deployed
    status, body = await call(http, "DELETE", f"{api}/api/v1/deployments/web")
    assert status == 200 and body == {}
    status, _ = await call(http, "GET", f"{api}/api/v1/deployments/web")
    assert status == 404


@pytest.mark.inprocess
async def test_nodes_and_pull_streams_newline_delimited_json(api, http, storage_node, tmp_path):
    status, body = await call(http, "GET", f"{api}/api/v1/nodes")
    assert status == 200 and [n["name"] for n in body["nodes"]] == ["n1"]
    assert body["nodes"][0]["storageAddress"].endswith(f":{storage_node.port}")
    status, body = await call(http, "GET", f"{api}/api/v1/nodes/n1")
    assert status == 200 and body["node"]["name"] == "n1"
    status, body = await call(http, "GET", f"{api}/api/v1/nodes/n9")
    assert status == 404

    blob = tmp_path / "layer.gguf"
    data = bytes(range(256)) * (3 * 4096)  # 3 MiB
    blob.write_bytes(data)
    status, _ = await call(http, "POST", f"{api}/api/v1/images", json=image_body("layer", blob.as_uri()))
    assert status == 200

    async with http.post(f"{api}/api/v1/images/layer:pull", json={"node": "n1"}, headers=AUTH) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("application/x-ndjson")
        lines = [json.loads(line) async for line in response.content if line.strip()]
    assert all(set(line) == {"result"} for line in lines), lines
    last = lines[-1]["result"]
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    assert last["node"] == "n1" and last["blob"]["digest"] == digest
    assert last["blob"]["sizeBytes"] == str(len(data))
    status, body = await call(http, "GET", f"{api}/api/v1/images/layer")
    assert body["image"]["digest"] == digest

    # A failure before the first message is a plain HTTP error with a Status body.
    status, body = await call(http, "POST", f"{api}/api/v1/images/ghost:pull", json={})
    assert status == 404 and body["code"] == 5
    status, body = await call(http, "POST", f"{api}/api/v1/images/layer:pull", json={"node": "n9"})
    assert status == 404 and "n9" in body["message"]


@pytest.mark.inprocess
async def test_requests_the_bridge_refuses_itself(api, http):
    status, body = await call(http, "GET", f"{api}/api/v1/nothing-here")
    assert status == 404 and body["code"] == 5
    status, body = await call(http, "PUT", f"{api}/api/v1/images/x")
    assert status == 405 and body["code"] == 12
    status, body = await call(http, "POST", f"{api}/api/v1/images", data=b"{not json",
                              headers={"Content-Type": "application/json"})
    assert status == 400 and detail(body, BAD_REQUEST)["fieldViolations"][0]["field"] == "body"
    status, body = await call(http, "POST", f"{api}/api/v1/images", json={"alias": "x", "sauceUrl": "file:///a"})
    assert status == 400 and "sauceUrl" in body["message"]
    status, body = await call(http, "GET", f"{api}/api/v1/images", params={"colour": "red"})
    assert status == 400 and detail(body, BAD_REQUEST)["fieldViolations"][0]["field"] == "colour"
    status, body = await call(http, "GET", f"{api}/api/v1/images/x", data=b'{"a": 1}')
    assert status == 400
    # The path wins over the body for a field both set.
    status, body = await call(http, "POST", f"{api}/api/v1/images/x:pull", json={"alias": "y"})
    assert status == 404 and "'x'" in body["message"]


@pytest.mark.inprocess
async def test_adapters_of_a_deployment_create_get_list_delete_and_their_errors(api, http):
    await create_deployment(api, http, "tuned", "base")
    # The path names the deployment; the body is the adapter.
    adapter = {"name": "pirate", "sourceUrl": "file:///models/pirate-lora.gguf"}
    status, body = await call(http, "POST", f"{api}/api/v1/deployments/tuned/adapters", json=adapter)
    assert status == 200, body
    assert body["adapter"]["deployment"] == "tuned" and body["adapter"]["name"] == "pirate"
    status, body = await call(http, "POST", f"{api}/api/v1/deployments/tuned/adapters", json=adapter)
    assert status == 409
    status, body = await call(http, "POST", f"{api}/api/v1/deployments/ghost/adapters", json=adapter)
    assert status == 404
    status, body = await call(http, "POST", f"{api}/api/v1/deployments/tuned/adapters",
                              json={"name": "bad", "sourceUrl": "oci://registry/x:1"})
    assert status == 400 and detail(body, BAD_REQUEST)["fieldViolations"][0]["field"] == "adapter.source_url"

    status, body = await call(http, "GET", f"{api}/api/v1/deployments/tuned/adapters/pirate")
    assert status == 200 and body["adapter"]["sourceUrl"] == adapter["sourceUrl"]
    status, body = await call(http, "GET", f"{api}/api/v1/deployments/tuned/adapters")
    assert status == 200 and [a["name"] for a in body["adapters"]] == ["pirate"]
    status, body = await call(http, "DELETE", f"{api}/api/v1/deployments/tuned/adapters/pirate")
    assert status == 200 and body == {}
    status, body = await call(http, "GET", f"{api}/api/v1/deployments/tuned/adapters/pirate")
    assert status == 404
    status, body = await call(http, "GET", f"{api}/api/v1/deployments/tuned/adapters")
    assert status == 200 and body.get("adapters", []) == []
    status, _ = await call(http, "DELETE", f"{api}/api/v1/deployments/tuned")
    assert status == 200


@pytest.mark.unit
async def test_every_annotated_rpc_is_served_and_covered_here():
    """If a new annotated RPC appears, this file must learn to exercise it."""
    import clowder.controller.v1.controller_pb2  # noqa: F401

    routes = routes_of(resolve_services(CONTROLLER_SERVICES))
    exercised = {
        "ImageService_CreateImage", "ImageService_GetImage", "ImageService_ListImages", "ImageService_DeleteImage",
        "ImageService_PullImage", "DeploymentService_CreateDeployment", "DeploymentService_GetDeployment",
        "DeploymentService_ListDeployments", "DeploymentService_UpdateDeployment",
        "DeploymentService_DeleteDeployment", "DeploymentService_ListReplicas", "NodeService_ListNodes",
        "NodeService_GetNode",
        # test_rest_services.py
        "ServingService_ApplyService", "ServingService_GetService", "ServingService_ListServices",
        "ServingService_PromoteService", "ServingService_RollbackService", "ServingService_SetServiceTraffic",
        "ServingService_DeleteService",
        "AdapterService_CreateAdapter", "AdapterService_GetAdapter", "AdapterService_ListAdapters",
        "AdapterService_DeleteAdapter",
    }
    assert {r.operation_id for r in routes} == exercised


@pytest.mark.inprocess
async def test_openapi_document_validates_and_lists_every_route(api, http):
    from openapi_spec_validator import validate

    async with http.get(f"{api}/api/v1/openapi.json") as response:
        assert response.status == 200
        document = await response.json()
    validate(document)
    operations = {(method.upper(), op["operationId"]) for path in document["paths"].values()
                  for method, op in path.items()}
    routes = routes_of(resolve_services(CONTROLLER_SERVICES))
    for route in routes:
        assert (route.http_method, route.operation_id) in operations
    assert {("POST", "Compat_CreateWorker"), ("GET", "Compat_ListWorkers")} <= operations
    pull = document["paths"]["/api/v1/images/{alias}:pull"]["post"]
    assert "application/x-ndjson" in pull["responses"]["200"]["content"]
    listing = document["paths"]["/api/v1/images"]["get"]
    assert {p["name"] for p in listing["parameters"]} >= {"pageSize", "pageToken"}


@pytest.mark.processes  # the controller starts a real runtime for the deployed model
async def test_original_clowder_worker_routes_deploy_and_list_a_model(api, http, storage_node, model_path):
    status, body = await call(http, "POST", f"{api}/api/v1/workers", json={"modelUrl": model_path.as_uri()})
    assert status == 400
    assert {v["field"] for v in detail(body, BAD_REQUEST)["fieldViolations"]} == {"modelAlias"}
    status, body = await call(http, "POST", f"{api}/api/v1/workers", json={
        "modelUrl": model_path.as_uri(), "modelAlias": "smol", "credentials": "hf_secret"})
    assert status == 400 and "hf_secret" not in json.dumps(body)
    status, body = await call(http, "POST", f"{api}/api/v1/workers", json={
        "modelUrl": model_path.as_uri(), "modelAlias": "smol", "nodeName": "elsewhere"})
    assert status == 404

    status, body = await call(http, "POST", f"{api}/api/v1/workers", json={
        "modelUrl": model_path.as_uri(), "modelAlias": "smol", "nodeName": "n1"})
    assert status == 200, body
    assert body["image"]["sourceUrl"] == model_path.as_uri() and body["deployment"]["replicas"] == 1

    async def ready_worker():
        status, body = await call(http, "GET", f"{api}/api/v1/workers/list")
        assert status == 200, body
        ready = [w for w in body["workers"] if w["state"] == "REPLICA_STATE_READY"]
        return ready[0] if ready else None

    worker = await wait_for(ready_worker, 180, "the worker to serve")
    assert worker["modelAlias"] == "smol" and worker["modelUrl"] == model_path.as_uri()
    assert worker["nodeName"] == "n1" and worker["endpoint"]

    status, body = await call(http, "POST", f"{api}/api/v1/workers", json={
        "modelUrl": "file:///other.gguf", "modelAlias": "smol"})
    assert status == 409
    status, body = await call(http, "GET", f"{api}/api/v1/workers/list", auth=False)
    assert status == 401
