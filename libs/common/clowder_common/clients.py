"""gRPC channels with the options every Clowder client uses."""

from __future__ import annotations

import contextlib

import grpc

from clowder.storage.v1 import storage_pb2_grpc
from clowder_common.security import NO_SECURITY, ClusterSecurity, client_interceptors

CHANNEL_OPTIONS = (
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.enable_retries", 1),
)


def aio_channel(address: str, security: ClusterSecurity = NO_SECURITY) -> grpc.aio.Channel:
    """A channel to `address`; with `security`, one that a cluster component uses to call another: over TLS when
    a CA is configured, and carrying the service credential on every call when there is one."""
    interceptors = client_interceptors(security) or None
    credentials = security.tls.channel_credentials()
    if credentials is not None:
        return grpc.aio.secure_channel(address, credentials, options=CHANNEL_OPTIONS, interceptors=interceptors)
    return grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS, interceptors=interceptors)


class StorageStubs:
    """Stubs for the storage services of a cluster's nodes: one channel per address, reused across calls."""

    def __init__(self, security: ClusterSecurity = NO_SECURITY) -> None:
        self._security = security
        self._channels: dict[str, grpc.aio.Channel] = {}

    def __call__(self, address: str) -> storage_pb2_grpc.StorageServiceStub:
        channel = self._channels.get(address)
        if channel is None:
            channel = self._channels[address] = aio_channel(address, self._security)
        return storage_pb2_grpc.StorageServiceStub(channel)

    async def close(self) -> None:
        channels, self._channels = self._channels, {}
        for channel in channels.values():
            with contextlib.suppress(Exception):
                await channel.close()


def sync_channel(address: str, security: ClusterSecurity = NO_SECURITY) -> grpc.Channel:
    credentials = security.tls.channel_credentials()
    channel = (grpc.secure_channel(address, credentials, options=CHANNEL_OPTIONS) if credentials is not None
               else grpc.insecure_channel(address, options=CHANNEL_OPTIONS))
    metadata = security.metadata()
    if metadata:
        channel = grpc.intercept_channel(channel, _SyncMetadata(metadata))
    return channel


class _SyncMetadata(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                    grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    """The sync twin of security._AddMetadata (tools and tests that call a runtime as a component)."""

    def __init__(self, metadata: tuple[tuple[str, str], ...]) -> None:
        self._metadata = metadata

    def _details(self, details):
        return _Details(details.method, details.timeout, [*(details.metadata or ()), *self._metadata],
                        details.credentials, getattr(details, "wait_for_ready", None),
                        getattr(details, "compression", None))

    def intercept_unary_unary(self, continuation, client_call_details, request):
        return continuation(self._details(client_call_details), request)

    def intercept_unary_stream(self, continuation, client_call_details, request):
        return continuation(self._details(client_call_details), request)

    def intercept_stream_unary(self, continuation, client_call_details, request_iterator):
        return continuation(self._details(client_call_details), request_iterator)

    def intercept_stream_stream(self, continuation, client_call_details, request_iterator):
        return continuation(self._details(client_call_details), request_iterator)


class _Details(grpc.ClientCallDetails):
    def __init__(self, method, timeout, metadata, credentials, wait_for_ready, compression) -> None:
        self.method = method
        self.timeout = timeout
        self.metadata = metadata
        self.credentials = credentials
        self.wait_for_ready = wait_for_ready
        self.compression = compression
