"""Runtime settings (slots, threads, context, batch size) through the REST bridge: set, masked updates, errors."""

from __future__ import annotations

import pytest

from rest_helpers import call

pytestmark = pytest.mark.inprocess

BAD_REQUEST = "type.googleapis.com/google.rpc.BadRequest"


def violations(body: dict) -> dict[str, str]:
    found = [d for d in body["details"] if d["@type"] == BAD_REQUEST]
    assert found, body
    return {v["field"]: v["description"] for v in found[0]["fieldViolations"]}


async def test_settings_over_rest_and_bad_ones_named(api, http):
    status, body = await call(http, "POST", f"{api}/api/v1/images", json={
        "alias": "smol", "sourceUrl": "file:///models/none.gguf",
        "configuration": {"slots": 2, "contextSize": 1024, "batchSize": 128}})
    assert status == 200, body
    assert body["image"]["configuration"]["slots"] == 2

    status, body = await call(http, "POST", f"{api}/api/v1/deployments",
                              json={"name": "web", "image": "smol", "replicas": 0, "slots": 0})
    assert status == 400 and body["code"] == 3  # INVALID_ARGUMENT
    assert list(violations(body)) == ["deployment.slots"]
    status, body = await call(http, "POST", f"{api}/api/v1/deployments",
                              json={"name": "web", "image": "smol", "replicas": 0, "threads": 1000})
    assert status == 400 and list(violations(body)) == ["deployment.threads"]
    status, body = await call(http, "POST", f"{api}/api/v1/images", json={
        "alias": "other", "sourceUrl": "file:///models/none.gguf", "configuration": {"batchSize": 4096}})
    assert status == 400 and list(violations(body)) == ["image.configuration.batch_size"]

    status, body = await call(http, "POST", f"{api}/api/v1/deployments", json={
        "name": "web", "image": "smol", "replicas": 0, "slots": 8, "contextSize": 2048, "batch_size": 256})
    assert status == 200, body
    created = body["deployment"]
    assert (created["slots"], created["contextSize"], created["batchSize"]) == (8, 2048, 256)
    # Unset optional settings are left out of the JSON (the aimage's apply), unlike plain fields.
    assert "threads" not in created

    # The mask as a query parameter, as in grpc-gateway: only slots changes.
    status, body = await call(http, "PATCH", f"{api}/api/v1/deployments/web?updateMask=slots",
                              json={"slots": 16, "contextSize": 64})
    assert status == 200, body
    assert (body["deployment"]["slots"], body["deployment"]["contextSize"]) == (16, 2048)
    status, body = await call(http, "PATCH", f"{api}/api/v1/deployments/web?updateMask=contextSize",
                              json={"contextSize": 8})
    # The batch size (256) no longer fits either: both are named.
    assert status == 400 and sorted(violations(body)) == ["deployment.batch_size", "deployment.context_size"]
