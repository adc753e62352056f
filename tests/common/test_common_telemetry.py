"""Spans from every gRPC server reach the configured exporter, and nothing is exported by default."""

from __future__ import annotations

import grpc
import pytest
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from clowder.controller.v1 import controller_pb2, controller_pb2_grpc
from clowder_common.errors import NotFound
from clowder_common.grpc_server import create_grpc_server
from clowder_common.telemetry import setup_telemetry

pytestmark = pytest.mark.unit


class Nodes(controller_pb2_grpc.NodeServiceServicer):
    async def ListNodes(self, request, context):
        return controller_pb2.ListNodesResponse()

    async def GetNode(self, request, context):
        raise NotFound("no such node")


def test_no_exporter_unless_configured(monkeypatch):
    monkeypatch.delenv("CLOWDER_OTEL_EXPORTER", raising=False)
    provider = setup_telemetry("test")
    assert provider._active_span_processor._span_processors == ()
    provider.shutdown()


async def test_server_calls_are_traced_with_their_status():
    provider = setup_telemetry("test", exporter="")
    exporter = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    def register(server):
        controller_pb2_grpc.add_NodeServiceServicer_to_server(Nodes(), server)
        return "clowder.controller.v1.NodeService"

    srv = create_grpc_server("127.0.0.1:0", [register], tracer_provider=provider)
    await srv.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{srv.port}") as channel:
            stub = controller_pb2_grpc.NodeServiceStub(channel)
            await stub.ListNodes(controller_pb2.ListNodesRequest())
            with pytest.raises(grpc.aio.AioRpcError):
                await stub.GetNode(controller_pb2.GetNodeRequest(name="x"))
    finally:
        await srv.stop(0)
        provider.shutdown()
    names = [s.name for s in exporter.get_finished_spans()]
    assert "/clowder.controller.v1.NodeService/ListNodes" in names
    assert "/clowder.controller.v1.NodeService/GetNode" in names
