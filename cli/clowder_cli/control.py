"""A small synchronous client for the control plane: token, deadlines, readable errors."""

from __future__ import annotations

import grpc

from clowder.controller.v1 import controller_pb2_grpc
from clowder_common.auth import bearer_metadata
from clowder_common.clients import sync_channel
from clowder_common.errors import ClowderError, from_rpc_error

CALL_DEADLINE_S = 15


class ControlPlane:
    def __init__(self, address: str, token: str | None) -> None:
        self.address = address
        self._channel = sync_channel(address)
        self._metadata = bearer_metadata(token)
        self.images = controller_pb2_grpc.ImageServiceStub(self._channel)
        self.deployments = controller_pb2_grpc.DeploymentServiceStub(self._channel)
        self.nodes = controller_pb2_grpc.NodeServiceStub(self._channel)

    def call(self, method, request, timeout: float = CALL_DEADLINE_S):
        """Unary call; failures come back as ClowderError with the server's details."""
        try:
            return method(request, metadata=self._metadata, timeout=timeout)
        except grpc.RpcError as err:
            raise from_rpc_error(err) from None

    def stream(self, method, request, timeout: float):
        try:
            yield from method(request, metadata=self._metadata, timeout=timeout)
        except grpc.RpcError as err:
            raise from_rpc_error(err) from None

    def close(self) -> None:
        self._channel.close()


def describe(error: ClowderError) -> str:
    """One readable paragraph: code, message, then each bad field."""
    lines = [f"{error.code.name}: {error.message}"]
    lines += [f"  {v.field}: {v.description}" for v in error.violations if v.description != error.message]
    return "\n".join(lines)
