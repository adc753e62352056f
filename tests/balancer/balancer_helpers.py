"""The balancer tests' own pieces: scripted runtime messages and a scripted runtime for fault injection.

Config, etcd records, waiting, real runtime processes and stream parsing are in tests/helpers (shared with other
folders).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import grpc

from clowder.runtime.v1 import runtime_pb2, runtime_pb2_grpc
from clowder_common.grpc_server import GrpcServer, create_grpc_server


# The admin token of the balancers the `make_balancer` fixture starts.
ADMIN = "admin-token-for-tests"

Behaviour = Callable[[runtime_pb2.GenerateRequest, grpc.aio.ServicerContext], AsyncIterator[runtime_pb2.GenerateResponse]]


class Clock:
    """A clock a test moves by hand (`clock.now += 5`), for code that takes a `clock` callable."""

    def __init__(self, now: float = 100.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def final(text: str = "", reason: int = runtime_pb2.FINISH_REASON_STOP, prompt_tokens: int = 3,
          completion_tokens: int = 1) -> runtime_pb2.GenerateResponse:
    return runtime_pb2.GenerateResponse(
        text=text, finish_reason=reason,
        usage=runtime_pb2.Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens),
    )


def speak(pieces: list[str], delay: float = 0.0, first_delay: float = 0.0) -> Behaviour:
    """Send `pieces` one message each, then a last message with finish_reason and usage."""

    async def behaviour(request, context):
        await asyncio.sleep(first_delay)
        for piece in pieces:
            yield runtime_pb2.GenerateResponse(text=piece)
            await asyncio.sleep(delay)
        yield final(completion_tokens=len(pieces))

    return behaviour


def fail(error: Exception, after: list[str] | None = None) -> Behaviour:
    """Raise `error` (a ClowderError, mapped by the real interceptor) after sending `after`."""

    async def behaviour(request, context):
        for piece in after or ():
            yield runtime_pb2.GenerateResponse(text=piece)
            await asyncio.sleep(0.01)
        raise error

    return behaviour


class ScriptedRuntime(runtime_pb2_grpc.RuntimeServiceServicer):
    """A RuntimeService whose Generate follows a script.

    Only for failures a real llama.cpp runtime cannot be made to show on demand
    (a full queue, a stall before the first token, a break mid-stream on cue);
    the happy paths are tested against real runtimes.
    """

    def __init__(self, behaviour: Behaviour) -> None:
        self.behaviour = behaviour
        self.requests: list[runtime_pb2.GenerateRequest] = []
        self.metadata: list[dict[str, str]] = []
        self.running = 0
        self.cancelled = 0
        self.server: GrpcServer | None = None

    @property
    def address(self) -> str:
        assert self.server is not None
        return f"127.0.0.1:{self.server.port}"

    async def start(self) -> "ScriptedRuntime":
        self.server = create_grpc_server("127.0.0.1:0", [self._register])
        await self.server.start()
        return self

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.stop(0)

    def _register(self, server: grpc.aio.Server) -> str:
        runtime_pb2_grpc.add_RuntimeServiceServicer_to_server(self, server)
        return runtime_pb2.DESCRIPTOR.services_by_name["RuntimeService"].full_name

    async def Generate(self, request, context):
        self.requests.append(request)
        self.metadata.append({k: v for k, v in context.invocation_metadata() or ()})
        self.running += 1
        try:
            async for message in self.behaviour(request, context):
                yield message
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        finally:
            self.running -= 1

    async def GetStats(self, request, context):
        return runtime_pb2.GetStatsResponse(num_requests_running=self.running, requests_total=len(self.requests))

    async def Embed(self, request, context):
        """A fixed-size vector per input (its length and word count), one prompt token per word."""
        self.requests.append(request)
        return runtime_pb2.EmbedResponse(
            embeddings=[runtime_pb2.Embedding(values=[float(len(t)), float(len(t.split()))]) for t in request.inputs],
            prompt_tokens=sum(len(t.split()) for t in request.inputs),
        )
