"""ServingService through the REST bridge, against the real controller (replicas 0: no runtime is started)."""

from __future__ import annotations

import pytest

from rest_helpers import call
from helpers.wait import wait_for

pytestmark = pytest.mark.inprocess


async def test_services_apply_split_promote_rollback_and_delete(api, http):
    for alias in ("web-a", "web-b"):
        status, body = await call(http, "POST", f"{api}/api/v1/images",
                                  json={"alias": alias, "sourceUrl": "file:///models/none.gguf"})
        assert status == 200, body
    status, body = await call(http, "POST", f"{api}/api/v1/services",
                              json={"template": {"name": "web", "image": "web-a", "replicas": 0}})
    assert status == 200 and body["changed"] and body["revision"] == 1, body
    status, body = await call(http, "GET", f"{api}/api/v1/services/web")
    assert status == 200 and body["service"]["traffic"] == [{"revision": 1, "percent": 100}]
    assert body["service"]["metrics"][0]["revision"] == 1
    status, body = await call(http, "GET", f"{api}/api/v1/services")
    assert [s["name"] for s in body["services"]] == ["web"]

    status, body = await call(http, "POST", f"{api}/api/v1/services",
                              json={"template": {"name": "web", "image": "web-b", "replicas": 0}, "weight": 30})
    assert status == 200 and body["revision"] == 2, body
    assert body["service"]["rollout"]["state"] == "ROLLOUT_STATE_FIXED"
    assert body["service"]["traffic"] == [{"revision": 1, "percent": 70}, {"revision": 2, "percent": 30}]
    status, body = await call(http, "GET", f"{api}/api/v1/deployments/web-r2")
    assert status == 200 and body["deployment"]["image"] == "web-b"

    status, body = await call(http, "POST", f"{api}/api/v1/services/web:setTraffic",
                              json={"traffic": [{"revision": 1, "percent": 50}, {"revision": 2, "percent": 40}]})
    assert status == 400 and "add up to 90" in body["message"]
    status, body = await call(http, "POST", f"{api}/api/v1/services/web:rollback", json={"revision": 9})
    assert status == 404 and "no revision 9" in body["message"]
    status, body = await call(http, "POST", f"{api}/api/v1/services/web:setTraffic",
                              json={"traffic": [{"revision": 1, "percent": 50}, {"revision": 2, "percent": 50}]})
    assert status == 200 and body["service"]["traffic"][1] == {"revision": 2, "percent": 50}

    status, body = await call(http, "POST", f"{api}/api/v1/services/web:promote", json={})
    assert status == 200 and body["service"]["rollout"]["stableRevision"] == 2
    status, _ = await call(http, "GET", f"{api}/api/v1/deployments/web")
    assert status == 404  # revision 1's deployment went with the promotion

    status, body = await call(http, "POST", f"{api}/api/v1/services/web:rollback", json={})
    assert status == 200 and body["service"]["rollout"]["state"] == "ROLLOUT_STATE_ROLLED_BACK"
    assert body["service"]["rollout"]["stableRevision"] == 1
    status, body = await call(http, "GET", f"{api}/api/v1/deployments/web-r2")
    assert body["deployment"]["image"] == "web-a"  # revision 1 rolled over the live deployment

    status, body = await call(http, "DELETE", f"{api}/api/v1/services/web")
    assert status == 200
    status, _ = await call(http, "GET", f"{api}/api/v1/services/web")
    assert status == 404

    async def deployment_gone():
        return (await call(http, "GET", f"{api}/api/v1/deployments/web-r2"))[0] == 404

    await wait_for(deployment_gone, 10, "the service's deployment deleted")


async def test_the_async_sdk_applies_and_refuses_with_nothing_changed(controller):
    from clowder.client import AsyncClient
    from clowder.controller.v1 import resources_pb2
    from clowder_common.errors import FailedPrecondition, InvalidArgument

    from rest_helpers import TOKEN

    async with AsyncClient(controller=f"127.0.0.1:{controller.port}", admin_token=TOKEN) as client:
        await client.images.create("sdk-a", "file:///models/none.gguf")
        created = await client.services.apply(resources_pb2.Deployment(name="sdk", image="sdk-a", replicas=0))
        assert created.changed and created.revision == 1
        again = await client.services.apply(resources_pb2.Deployment(name="sdk", image="sdk-a", replicas=0))
        assert not again.changed
        before = await client.services.get("sdk")
        try:
            await client.services.promote("sdk")
            raise AssertionError("promote of a service with one revision succeeded")
        except FailedPrecondition as err:
            assert "one revision" in err.message
        try:
            await client.services.apply(resources_pb2.Deployment(name="sdk", image="sdk-a", replicas=0),
                                        resources_pb2.RolloutPolicy(steps=[60, 30]))
            raise AssertionError("steps that go down were accepted")
        except InvalidArgument as err:
            assert err.violations[0].field == "rollout.steps[1]"
        after = await client.services.get("sdk")
        assert (after.update_time, len(after.revisions)) == (before.update_time, 1)
        assert [s.name for s in await client.services.list()] == ["sdk"]
        await client.services.delete("sdk")


async def test_a_deployment_made_before_revisions_becomes_revision_1(api, http):
    """`serve up` once made a bare deployment named like the service: the first update adopts it."""
    for alias in ("old-a", "old-b"):
        status, _ = await call(http, "POST", f"{api}/api/v1/images",
                               json={"alias": alias, "sourceUrl": "file:///models/none.gguf"})
        assert status == 200
    status, _ = await call(http, "POST", f"{api}/api/v1/deployments",
                           json={"name": "old", "image": "old-a", "replicas": 0})
    assert status == 200
    status, body = await call(http, "POST", f"{api}/api/v1/services",
                              json={"template": {"name": "old", "image": "old-b", "replicas": 0}})
    assert status == 200 and body["revision"] == 2, body
    revisions = body["service"]["revisions"]
    assert [(r["number"], r["deployment"], r["template"]["image"]) for r in revisions] == [
        (1, "old", "old-a"), (2, "old", "old-b")]
    status, body = await call(http, "GET", f"{api}/api/v1/deployments/old")
    assert body["deployment"]["image"] == "old-b"  # rolled in place, the default
    # A deployment that happens to have the next revision's name is never taken over.
    status, _ = await call(http, "POST", f"{api}/api/v1/deployments",
                           json={"name": "old-r3", "image": "old-a", "replicas": 0})
    assert status == 200
    status, body = await call(http, "POST", f"{api}/api/v1/services",
                              json={"template": {"name": "old", "image": "old-a", "replicas": 0}, "weight": 10})
    assert status == 400 and body["code"] == 9 and "old-r3" in body["message"], body  # FAILED_PRECONDITION
    status, body = await call(http, "GET", f"{api}/api/v1/services/old")
    assert len(body["service"]["revisions"]) == 2 and body["service"]["rollout"]["candidateRevision"] == 0
    status, body = await call(http, "GET", f"{api}/api/v1/deployments/old-r3")
    assert body["deployment"]["image"] == "old-a"
