"""Build a grpc.aio server with health, reflection, error mapping and auth already in place."""

from __future__ import annotations

from typing import Callable, Iterable, Sequence

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from opentelemetry.instrumentation.grpc import aio_server_interceptor

from clowder_common.errors import Unavailable
from clowder_common.interceptors import ErrorInterceptor
from clowder_common.security import Tls

# Long streams (token generation, pulls) need HTTP/2 keepalive to notice dead peers.
SERVER_OPTIONS = (
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
)


class GrpcServer:
    """A server plus its health servicer; `port` is the bound port (useful with port 0)."""

    def __init__(self, server: grpc.aio.Server, port: int, health_servicer: health.aio.HealthServicer,
                 service_names: Sequence[str]) -> None:
        self.server = server
        self.port = port
        self.health = health_servicer
        self.service_names = list(service_names)

    async def start(self) -> None:
        await self.server.start()
        await self.set_serving(True)

    async def set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ["", *self.service_names]:
            await self.health.set(name, status)

    async def stop(self, grace: float) -> None:
        """NOT_SERVING first so probes and balancers move away, then drain for `grace` seconds."""
        await self.set_serving(False)
        await self.server.stop(grace)


def create_grpc_server(
    address: str,
    register: Iterable[Callable[[grpc.aio.Server], str]],
    admin_token: str | None = None,
    extra_interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
    tracer_provider=None,
    service_token: str | None = None,
    tls: Tls | None = None,
) -> GrpcServer:
    """Bind `address` ("host:port", port 0 for any) and add the servicers.

    Each `register` callable adds one servicer and returns its full service name
    (for health and reflection). Spans go to `tracer_provider`, else the global one. With `service_token`,
    calls need the cluster's service credential (see ErrorInterceptor); with `tls` holding a certificate and
    key, the port speaks TLS only, so a plaintext client cannot connect.
    """
    server = grpc.aio.server(
        # Tracing outermost, so a span records the status the error interceptor chose.
        interceptors=[aio_server_interceptor(tracer_provider=tracer_provider), *extra_interceptors, ErrorInterceptor(admin_token, service_token)],
        options=SERVER_OPTIONS,
    )
    names = [reg(server) for reg in register]
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        [*names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME], server
    )
    credentials = tls.server_credentials() if tls is not None else None
    port = server.add_secure_port(address, credentials) if credentials is not None else server.add_insecure_port(address)
    if port == 0:
        raise Unavailable(f"cannot bind gRPC address {address}")
    return GrpcServer(server, port, health_servicer, names)
