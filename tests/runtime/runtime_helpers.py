"""What the runtime tests share: a runtime served in the test's process, a stub on it, waiting for its stats."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable

import grpc

from clowder.controller.v1 import resources_pb2
from clowder.runtime.v1 import runtime_pb2, runtime_pb2_grpc
from clowder_runtime.app import RuntimeApp, create_runtime
from clowder_runtime.config import RuntimeConfig
from helpers.wait import wait_for


@contextlib.asynccontextmanager
async def running_runtime(config: RuntimeConfig,
                          image: resources_pb2.ImageConfiguration | None = None) -> AsyncIterator[RuntimeApp]:
    """A started runtime (gRPC on the port its config names), stopped afterwards."""
    app = await create_runtime(config, image)
    await app.start()
    try:
        yield app
    finally:
        await app.stop()


@contextlib.asynccontextmanager
async def runtime_stub(app: RuntimeApp) -> AsyncIterator[runtime_pb2_grpc.RuntimeServiceStub]:
    """A RuntimeService stub on `app`'s port, its channel closed afterwards."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
        yield runtime_pb2_grpc.RuntimeServiceStub(channel)


async def wait_for_stats(stub: runtime_pb2_grpc.RuntimeServiceStub,
                         predicate: Callable[[runtime_pb2.GetStatsResponse], bool],
                         timeout: float = 30.0) -> runtime_pb2.GetStatsResponse:
    """The runtime's stats once `predicate` holds for them, polled every 20 ms (slots change quickly)."""
    last: list[runtime_pb2.GetStatsResponse] = []

    async def matching() -> runtime_pb2.GetStatsResponse | None:
        stats = await stub.GetStats(runtime_pb2.GetStatsRequest(), timeout=5)
        last[:] = [stats]
        return stats if predicate(stats) else None

    try:
        return await wait_for(matching, timeout, "runtime stats", interval=0.02)
    except AssertionError:
        raise AssertionError(f"stats never matched within {timeout}s: {last[0] if last else None}") from None
