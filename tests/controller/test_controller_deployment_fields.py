"""Deployment placement and autoscaling fields over the API: validation, update masks, autoscaled creation."""

from __future__ import annotations

import grpc
import pytest
from google.protobuf import field_mask_pb2

from clowder.controller.v1 import controller_pb2, controller_pb2_grpc, resources_pb2
from clowder_common import keys
from clowder_common.auth import bearer_metadata
from clowder_controller.app import create_controller

from controller_helpers import error_of
from helpers.configs import controller_config

pytestmark = pytest.mark.inprocess

TOKEN = "fields-test-token"
AUTH = bearer_metadata(TOKEN)


@pytest.fixture
async def deployments(etcd, etcd_prefix, state, tmp_path):
    config = controller_config(etcd.endpoint, etcd_prefix, tmp_path, max_replicas=10)
    app = await create_controller(config, TOKEN)
    await app.start()
    await state.put(state.key(keys.image("m")), resources_pb2.Image(alias="m", source_url="file:///m.gguf"))
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{app.port}")
    yield controller_pb2_grpc.DeploymentServiceStub(channel)
    await channel.close()
    await app.stop()


@pytest.mark.parametrize("fields, bad", [
    ({"max_replicas": 11}, "deployment.max_replicas"),
    ({"min_replicas": 4, "max_replicas": 3}, "deployment.min_replicas"),
    ({"min_replicas": 2}, "deployment.max_replicas"),
    ({"max_replicas": 3, "target_in_flight": -1.0}, "deployment.target_in_flight"),
    ({"max_replicas": 3, "min_replicas": 1, "scale_to_zero_after_s": 60}, "deployment.scale_to_zero_after_s"),
])
async def test_bad_autoscaling_fields_name_the_field(deployments, fields, bad):
    err = await error_of(deployments.CreateDeployment(controller_pb2.CreateDeploymentRequest(
        deployment=resources_pb2.Deployment(name="d", image="m", **fields)), metadata=AUTH))
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT
    assert bad in {v.field for v in err.violations}


async def test_autoscaled_deployment_starts_within_its_bounds(deployments):
    reply = await deployments.CreateDeployment(controller_pb2.CreateDeploymentRequest(
        deployment=resources_pb2.Deployment(name="d", image="m", replicas=0, min_replicas=2, max_replicas=5)),
        metadata=AUTH)
    assert reply.deployment.replicas == 2


async def test_update_mask_writes_only_the_named_fields(deployments):
    await deployments.CreateDeployment(controller_pb2.CreateDeploymentRequest(
        deployment=resources_pb2.Deployment(name="d", image="m", replicas=2)), metadata=AUTH)
    reply = await deployments.UpdateDeployment(controller_pb2.UpdateDeploymentRequest(
        deployment=resources_pb2.Deployment(name="d", node_selector={"zone": "a"}, max_replicas=4, replicas=9),
        update_mask=field_mask_pb2.FieldMask(paths=["node_selector", "max_replicas"])), metadata=AUTH)
    assert dict(reply.deployment.node_selector) == {"zone": "a"} and reply.deployment.max_replicas == 4
    assert reply.deployment.replicas == 2 and reply.deployment.image == "m"
    # Without a mask: the old behaviour (replicas, and the image when given).
    reply = await deployments.UpdateDeployment(controller_pb2.UpdateDeploymentRequest(
        deployment=resources_pb2.Deployment(name="d", replicas=3)), metadata=AUTH)
    assert reply.deployment.replicas == 3 and dict(reply.deployment.node_selector) == {"zone": "a"}
    err = await error_of(deployments.UpdateDeployment(controller_pb2.UpdateDeploymentRequest(
        deployment=resources_pb2.Deployment(name="d"), update_mask=field_mask_pb2.FieldMask(paths=["name"])),
        metadata=AUTH))
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT and err.violations[0].field == "update_mask"
    # The result must still be valid as a whole.
    err = await error_of(deployments.UpdateDeployment(controller_pb2.UpdateDeploymentRequest(
        deployment=resources_pb2.Deployment(name="d", min_replicas=9),
        update_mask=field_mask_pb2.FieldMask(paths=["min_replicas"])), metadata=AUTH))
    assert "deployment.min_replicas" in {v.field for v in err.violations}


async def test_deleting_a_deployment_removes_its_events(deployments, state):
    await deployments.CreateDeployment(controller_pb2.CreateDeploymentRequest(
        deployment=resources_pb2.Deployment(name="d", image="m", replicas=0)), metadata=AUTH)
    await state.put(state.key("events/d"), resources_pb2.DeploymentEvents(
        events=[resources_pb2.DeploymentEvent(reason="scaled", message="x")]))
    got = await deployments.GetDeployment(controller_pb2.GetDeploymentRequest(name="d"), metadata=AUTH)
    assert [e.reason for e in got.deployment.events] == ["scaled"]
    await deployments.DeleteDeployment(controller_pb2.DeleteDeploymentRequest(name="d"), metadata=AUTH)
    assert await state.get(state.key("events/d"), resources_pb2.DeploymentEvents) is None
