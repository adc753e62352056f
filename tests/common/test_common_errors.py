"""Errors cross the wire with their code and details; unexpected ones never leak internals."""

from __future__ import annotations

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from clowder.controller.v1 import controller_pb2, controller_pb2_grpc
from clowder_common.auth import bearer_metadata
from clowder_common.errors import HTTP_STATUS, InvalidArgument, NotFound, Unavailable, from_rpc_error
from clowder_common.grpc_server import create_grpc_server


class Nodes(controller_pb2_grpc.NodeServiceServicer):
    async def GetNode(self, request, context):
        if request.name == "bad":
            raise InvalidArgument("name is bad", field="name")
        if request.name == "busy":
            raise Unavailable("try later", retry_after=1.5)
        if request.name == "boom":
            raise RuntimeError("secret database password is hunter2")
        raise NotFound(f"node {request.name} not found", reason="NODE_NOT_FOUND", metadata={"node": request.name})


class Images(controller_pb2_grpc.ImageServiceServicer):
    """A stream that fails after its first message: the status must still carry the error's code."""

    async def PullImage(self, request, context):
        yield controller_pb2.PullImageResponse(node="n1")
        if request.alias == "bad":
            raise InvalidArgument("alias is bad", field="alias")
        raise RuntimeError("secret database password is hunter2")


@pytest.fixture
async def server():
    def register(srv):
        controller_pb2_grpc.add_NodeServiceServicer_to_server(Nodes(), srv)
        return "clowder.controller.v1.NodeService"

    def register_images(srv):
        controller_pb2_grpc.add_ImageServiceServicer_to_server(Images(), srv)
        return "clowder.controller.v1.ImageService"

    srv = create_grpc_server("127.0.0.1:0", [register, register_images], admin_token="tok")
    await srv.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{srv.port}")
    yield srv, controller_pb2_grpc.NodeServiceStub(channel), channel
    await channel.close()
    await srv.stop(0)


async def call(stub, name):
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.GetNode(controller_pb2.GetNodeRequest(name=name), metadata=bearer_metadata("tok"))
    return info.value


@pytest.mark.inprocess
async def test_domain_errors_keep_code_reason_and_details(server):
    _, stub, _ = server
    err = await call(stub, "x")
    decoded = from_rpc_error(err)
    assert err.code() == grpc.StatusCode.NOT_FOUND
    assert isinstance(decoded, NotFound) and decoded.reason == "NODE_NOT_FOUND" and decoded.metadata == {"node": "x"}
    bad = from_rpc_error(await call(stub, "bad"))
    assert isinstance(bad, InvalidArgument) and [(v.field, v.description) for v in bad.violations] == [
        ("name", "name is bad")]
    busy = from_rpc_error(await call(stub, "busy"))
    assert busy.retry_after == pytest.approx(1.5)


@pytest.mark.inprocess
async def test_unexpected_errors_become_opaque_internal(server):
    _, stub, _ = server
    err = await call(stub, "boom")
    assert err.code() == grpc.StatusCode.INTERNAL
    assert "hunter2" not in err.details() and "incident" in err.details()


@pytest.mark.inprocess
async def test_a_stream_that_fails_midway_ends_with_the_errors_status(server):
    _, _, channel = server
    stub = controller_pb2_grpc.ImageServiceStub(channel)
    for alias, code in (("bad", grpc.StatusCode.INVALID_ARGUMENT), ("boom", grpc.StatusCode.INTERNAL)):
        received = []
        with pytest.raises(grpc.aio.AioRpcError) as info:
            async for message in stub.PullImage(controller_pb2.PullImageRequest(alias=alias),
                                                metadata=bearer_metadata("tok")):
                received.append(message.node)
        assert received == ["n1"] and info.value.code() == code
        assert "hunter2" not in info.value.details()
    # The guard (here the admin token) runs before the stream's first message.
    with pytest.raises(grpc.aio.AioRpcError) as info:
        async for _ in stub.PullImage(controller_pb2.PullImageRequest(alias="bad")):
            pass
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED


@pytest.mark.inprocess
async def test_health_goes_not_serving_on_stop(server):
    srv, _, channel = server
    health = health_pb2_grpc.HealthStub(channel)
    reply = await health.Check(health_pb2.HealthCheckRequest(service="clowder.controller.v1.NodeService"))
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    await srv.set_serving(False)
    reply = await health.Check(health_pb2.HealthCheckRequest(service=""))
    assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING


@pytest.mark.unit
def test_http_mapping_matches_grpc_gateway():
    assert HTTP_STATUS[grpc.StatusCode.NOT_FOUND] == 404
    assert HTTP_STATUS[grpc.StatusCode.INVALID_ARGUMENT] == 400
    assert HTTP_STATUS[grpc.StatusCode.UNAUTHENTICATED] == 401
    assert HTTP_STATUS[grpc.StatusCode.UNAVAILABLE] == 503
    assert HTTP_STATUS[grpc.StatusCode.RESOURCE_EXHAUSTED] == 429
