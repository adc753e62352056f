"""The control-plane API in-process against a real etcd: CRUD, errors with details, auth."""

from __future__ import annotations

import asyncio
import pathlib

import grpc
import pytest

from clowder.controller.v1 import controller_pb2, controller_pb2_grpc, resources_pb2
from clowder_common import keys
from clowder_common.auth import bearer_metadata
from clowder_common.errors import from_rpc_error
from clowder_controller.app import create_controller
from helpers.configs import controller_config

pytestmark = pytest.mark.processes

TOKEN = "test-admin-token-1234"


@pytest.fixture
async def controller(etcd, etcd_prefix, state, tmp_path: pathlib.Path):
    config = controller_config(etcd.endpoint, etcd_prefix, tmp_path)
    app = await create_controller(config, TOKEN)
    await app.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{app.port}")
    yield app, channel
    await channel.close()
    await app.stop()


def stubs(channel):
    return (controller_pb2_grpc.ImageServiceStub(channel), controller_pb2_grpc.DeploymentServiceStub(channel),
            controller_pb2_grpc.NodeServiceStub(channel))


AUTH = bearer_metadata(TOKEN)


async def expect_error(call, code: grpc.StatusCode):
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    assert info.value.code() == code, info.value.details()
    return from_rpc_error(info.value)


def image(alias: str = "smol", url: str = "file:///models/smol.gguf") -> resources_pb2.Image:
    return resources_pb2.Image(alias=alias, source_url=url)


async def test_calls_without_the_token_are_refused(controller):
    _, channel = controller
    images, _, _ = stubs(channel)
    err = await expect_error(images.ListImages(controller_pb2.ListImagesRequest()),
                             grpc.StatusCode.UNAUTHENTICATED)
    assert "bearer" in err.message
    err = await expect_error(images.ListImages(controller_pb2.ListImagesRequest(),
                                               metadata=bearer_metadata("wrong")), grpc.StatusCode.UNAUTHENTICATED)
    assert err.reason == "INVALID_TOKEN"


async def test_health_needs_no_token(controller):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    _, channel = controller
    reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""))
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def test_image_lifecycle(controller):
    _, channel = controller
    images, _, _ = stubs(channel)
    sent = image()
    sent.digest = "sha256:" + "0" * 64  # output-only: must be ignored
    created = await images.CreateImage(controller_pb2.CreateImageRequest(image=sent), metadata=AUTH)
    assert created.image.alias == "smol" and created.image.digest == "" and created.image.create_time.seconds > 0
    err = await expect_error(images.CreateImage(controller_pb2.CreateImageRequest(image=image()), metadata=AUTH),
                             grpc.StatusCode.ALREADY_EXISTS)
    assert "smol" in err.message
    got = await images.GetImage(controller_pb2.GetImageRequest(alias="smol"), metadata=AUTH)
    assert got.image.source_url == "file:///models/smol.gguf"
    await images.DeleteImage(controller_pb2.DeleteImageRequest(alias="smol"), metadata=AUTH)
    err = await expect_error(images.GetImage(controller_pb2.GetImageRequest(alias="smol"), metadata=AUTH),
                             grpc.StatusCode.NOT_FOUND)
    assert err.reason == "IMAGE_NOT_FOUND"


async def test_invalid_image_names_the_field(controller):
    _, channel = controller
    images, _, _ = stubs(channel)
    err = await expect_error(images.CreateImage(controller_pb2.CreateImageRequest(image=image(url="ftp://x/y")),
                                                metadata=AUTH), grpc.StatusCode.INVALID_ARGUMENT)
    assert [v.field for v in err.violations] == ["image.source_url"]


async def test_list_images_pages(controller):
    _, channel = controller
    images, _, _ = stubs(channel)
    for i in range(5):
        await images.CreateImage(controller_pb2.CreateImageRequest(image=image(f"m{i}")), metadata=AUTH)
    names, token = [], ""
    while True:
        page = await images.ListImages(controller_pb2.ListImagesRequest(page_size=2, page_token=token),
                                       metadata=AUTH)
        names += [i.alias for i in page.images]
        token = page.next_page_token
        if not token:
            break
    assert names == [f"m{i}" for i in range(5)]


async def test_deployment_needs_an_existing_image_and_blocks_its_deletion(controller):
    _, channel = controller
    images, deployments, _ = stubs(channel)
    err = await expect_error(deployments.CreateDeployment(controller_pb2.CreateDeploymentRequest(
        deployment=resources_pb2.Deployment(image="ghost", replicas=1)), metadata=AUTH), grpc.StatusCode.NOT_FOUND)
    assert err.reason == "IMAGE_NOT_FOUND"
    await images.CreateImage(controller_pb2.CreateImageRequest(image=image()), metadata=AUTH)
    created = await deployments.CreateDeployment(controller_pb2.CreateDeploymentRequest(
        deployment=resources_pb2.Deployment(image="smol", replicas=1)), metadata=AUTH)
    assert created.deployment.name == "smol"  # defaults to the image alias
    err = await expect_error(images.DeleteImage(controller_pb2.DeleteImageRequest(alias="smol"), metadata=AUTH),
                             grpc.StatusCode.FAILED_PRECONDITION)
    assert err.reason == "IMAGE_IN_USE"
    err = await expect_error(deployments.UpdateDeployment(controller_pb2.UpdateDeploymentRequest(
        deployment=resources_pb2.Deployment(name="smol", replicas=1000)), metadata=AUTH),
        grpc.StatusCode.INVALID_ARGUMENT)
    assert err.violations[0].field == "deployment.replicas"


async def test_replicas_wait_for_a_node_and_follow_scaling(controller, state):
    _, channel = controller
    images, deployments, _ = stubs(channel)
    await images.CreateImage(controller_pb2.CreateImageRequest(image=image()), metadata=AUTH)
    await deployments.CreateDeployment(controller_pb2.CreateDeploymentRequest(
        deployment=resources_pb2.Deployment(name="d", image="smol", replicas=2)), metadata=AUTH)

    async def replicas():
        reply = await deployments.ListReplicas(controller_pb2.ListReplicasRequest(deployment="d"), metadata=AUTH)
        return list(reply.replicas)

    for _ in range(100):
        current = await replicas()
        if len(current) == 2 and all("storage node" in r.message for r in current):
            break
        await asyncio.sleep(0.05)
    # No storage node registered: placed nowhere, pending with a reason a person can act on.
    assert [r.state for r in current] == [resources_pb2.REPLICA_STATE_PENDING] * 2
    assert all(r.message == "waiting for a storage node to register" and not r.node for r in current)
    await deployments.UpdateDeployment(controller_pb2.UpdateDeploymentRequest(
        deployment=resources_pb2.Deployment(name="d", replicas=0)), metadata=AUTH)
    for _ in range(100):
        if not await replicas():
            break
        await asyncio.sleep(0.05)
    assert await replicas() == []
    await deployments.DeleteDeployment(controller_pb2.DeleteDeploymentRequest(name="d"), metadata=AUTH)
    assert await state.get(state.key(keys.deployment("d")), resources_pb2.Deployment) is None


async def test_pull_without_nodes_is_unavailable(controller):
    _, channel = controller
    images, _, nodes = stubs(channel)
    await images.CreateImage(controller_pb2.CreateImageRequest(image=image()), metadata=AUTH)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        async for _ in images.PullImage(controller_pb2.PullImageRequest(alias="smol"), metadata=AUTH):
            pass
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert from_rpc_error(info.value).reason == "NO_NODES"
    listed = await nodes.ListNodes(controller_pb2.ListNodesRequest(), metadata=AUTH)
    assert list(listed.nodes) == []
