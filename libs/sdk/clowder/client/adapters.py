"""A deployment's LoRA adapters in the SDK (`client.adapters`): added and removed while it runs, sync and asyncio."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from clowder.controller.v1 import adapters_pb2, adapters_pb2_grpc
from clowder_common.errors import DeadlineExceeded


def _adapter(deployment: str, name: str, source_url: str, digest: str, credentials_ref: str,
             credentials_username: str) -> adapters_pb2.Adapter:
    return adapters_pb2.Adapter(deployment=deployment, name=name, source_url=source_url, digest=digest,
                                credentials_ref=credentials_ref, credentials_username=credentials_username)


def _loaded(adapter: adapters_pb2.Adapter) -> bool:
    return adapter.ready_replicas > 0 and adapter.loaded_replicas == adapter.ready_replicas


def _not_loaded(adapter: adapters_pb2.Adapter, timeout_s: float) -> DeadlineExceeded:
    why = f"; last failure: {adapter.message}" if adapter.message else ""
    return DeadlineExceeded(f"adapter {adapter.name!r} is loaded on {adapter.loaded_replicas}/"
                            f"{adapter.ready_replicas} ready replicas of {adapter.deployment!r} after {timeout_s:g}s"
                            + why, reason="ADAPTER_NOT_LOADED")


class Adapters:
    """Add (`add`), inspect and remove (`remove`) a deployment's adapters; requests select one with `adapter`."""

    def __init__(self, caller: Any, stub: adapters_pb2_grpc.AdapterServiceStub) -> None:
        self._call, self._stub = caller, stub

    def add(self, deployment: str, name: str, source_url: str, *, digest: str = "", credentials_ref: str = "",
            credentials_username: str = "") -> adapters_pb2.Adapter:
        request = adapters_pb2.CreateAdapterRequest(adapter=_adapter(deployment, name, source_url, digest,
                                                                     credentials_ref, credentials_username))
        return self._call.unary(self._stub.CreateAdapter, request, idempotent=False).adapter

    def get(self, deployment: str, name: str) -> adapters_pb2.Adapter:
        return self._call.unary(self._stub.GetAdapter, adapters_pb2.GetAdapterRequest(deployment=deployment,
                                                                                       name=name), idempotent=True).adapter

    def list(self, deployment: str) -> list[adapters_pb2.Adapter]:
        return list(self._call.unary(self._stub.ListAdapters, adapters_pb2.ListAdaptersRequest(deployment=deployment),
                                     idempotent=True).adapters)

    def remove(self, deployment: str, name: str) -> None:
        self._call.unary(self._stub.DeleteAdapter, adapters_pb2.DeleteAdapterRequest(deployment=deployment, name=name),
                         idempotent=False)

    def wait_loaded(self, deployment: str, name: str, timeout_s: float = 300.0,
                    poll_s: float = 0.25) -> adapters_pb2.Adapter:
        """Block until every ready replica serves the adapter; DeadlineExceeded (with the last failure) if not."""
        deadline = time.monotonic() + timeout_s
        while True:
            current = self.get(deployment, name)
            if _loaded(current):
                return current
            if time.monotonic() > deadline:
                raise _not_loaded(current, timeout_s)
            time.sleep(poll_s)


class AsyncAdapters:
    """Adapters for the asyncio client."""

    def __init__(self, caller: Any, stub: adapters_pb2_grpc.AdapterServiceStub) -> None:
        self._call, self._stub = caller, stub

    async def add(self, deployment: str, name: str, source_url: str, *, digest: str = "", credentials_ref: str = "",
                  credentials_username: str = "") -> adapters_pb2.Adapter:
        request = adapters_pb2.CreateAdapterRequest(adapter=_adapter(deployment, name, source_url, digest,
                                                                     credentials_ref, credentials_username))
        return (await self._call.unary(self._stub.CreateAdapter, request, idempotent=False)).adapter

    async def get(self, deployment: str, name: str) -> adapters_pb2.Adapter:
        request = adapters_pb2.GetAdapterRequest(deployment=deployment, name=name)
        return (await self._call.unary(self._stub.GetAdapter, request, idempotent=True)).adapter

    async def list(self, deployment: str) -> list[adapters_pb2.Adapter]:
        request = adapters_pb2.ListAdaptersRequest(deployment=deployment)
        return list((await self._call.unary(self._stub.ListAdapters, request, idempotent=True)).adapters)

    async def remove(self, deployment: str, name: str) -> None:
        request = adapters_pb2.DeleteAdapterRequest(deployment=deployment, name=name)
        await self._call.unary(self._stub.DeleteAdapter, request, idempotent=False)

    async def wait_loaded(self, deployment: str, name: str, timeout_s: float = 300.0,
                          poll_s: float = 0.25) -> adapters_pb2.Adapter:
        deadline = time.monotonic() + timeout_s
        while True:
            current = await self.get(deployment, name)
            if _loaded(current):
                return current
            if time.monotonic() > deadline:
                raise _not_loaded(current, timeout_s)
            await asyncio.sleep(poll_s)
