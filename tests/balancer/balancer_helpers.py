"""Shared pieces of the balancer tests: config, etcd records, waiting, and a scripted runtime for fault injection."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import pathlib
import subprocess
import sys
import time
from typing import AsyncIterator, Awaitable, Callable, Iterable

import grpc

from clowder.controller.v1 import resources_pb2
from clowder.runtime.v1 import runtime_pb2, runtime_pb2_grpc
from clowder_common import keys
from clowder_common.etcd import EtcdState
from clowder_common.grpc_server import GrpcServer, create_grpc_server
from clowder_common.processes import spawn, terminate

from clowder_balancer.config import BalancerConfig

Behaviour = Callable[[runtime_pb2.GenerateRequest, grpc.aio.ServicerContext], AsyncIterator[runtime_pb2.GenerateResponse]]


def balancer_config(etcd_endpoint: str, prefix: str, **overrides) -> BalancerConfig:
    settings = dict(
        etcd_endpoints=(etcd_endpoint,),
        etcd_prefix=prefix,
        http_listen="127.0.0.1:0",
        grpc_listen="127.0.0.1:0",
        ready_timeout_s=2.0,
        drain_grace_s=3.0,
    )
    settings.update(overrides)
    return BalancerConfig(**settings)


async def put_deployment(state: EtcdState, name: str, replicas: int = 1) -> None:
    await state.put(state.key(keys.deployment(name)), resources_pb2.Deployment(name=name, image=name, replicas=replicas))


async def put_endpoint(state: EtcdState, deployment: str, replica_id: str, address: str) -> None:
    endpoint = runtime_pb2.Endpoint(deployment=deployment, replica_id=replica_id, address=address, node="local")
    await state.put(state.key(keys.endpoint(deployment, replica_id)), endpoint)


async def wait_until(predicate: Callable[[], bool | Awaitable[bool]], timeout: float = 5.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate}")
        await asyncio.sleep(0.05)


def sse_events(body: str) -> list[dict | str]:
    """The data of each server-sent event of an OpenAI stream: JSON objects, and the "[DONE]" marker as is."""
    out: list[dict | str] = []
    for block in body.split("\n\n"):
        if block.startswith("data: "):
            data = block.removeprefix("data: ")
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


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


@dataclasses.dataclass
class RuntimeProcess:
    """A real `clowder_runtime` process serving the bundled model, registered in etcd."""

    replica_id: str
    proc: subprocess.Popen
    address: str
    stub: runtime_pb2_grpc.RuntimeServiceStub
    channel: grpc.aio.Channel

    async def stats(self) -> runtime_pb2.GetStatsResponse:
        return await self.stub.GetStats(runtime_pb2.GetStatsRequest(), timeout=5)


@contextlib.asynccontextmanager
async def runtime_processes(state: EtcdState, etcd_endpoint: str, deployment: str, replica_ids: Iterable[str],
                            model_path, work: pathlib.Path, start_timeout_s: float = 60.0,
                            extra_args: Iterable[str] = ()) -> AsyncIterator[list[RuntimeProcess]]:
    procs: dict[str, tuple[subprocess.Popen, pathlib.Path]] = {}
    logs = []
    started: list[RuntimeProcess] = []
    try:
        for replica_id in replica_ids:
            port_file = work / f"{replica_id}.port"
            log = open(work / f"{replica_id}.log", "wb")
            logs.append(log)
            argv = [
                sys.executable, "-m", "clowder_runtime",
                "--model-path", str(model_path), "--listen", "127.0.0.1:0", "--port-file", str(port_file),
                "--deployment", deployment, "--replica-id", replica_id,
                "--etcd-endpoints", etcd_endpoint, "--etcd-prefix", state.prefix, "--threads", "1",
                *extra_args,
            ]
            procs[replica_id] = (spawn(argv, log), port_file)
        for replica_id, (proc, port_file) in procs.items():
            deadline = time.monotonic() + start_timeout_s
            key = state.key(keys.endpoint(deployment, replica_id))
            while await state.get(key, runtime_pb2.Endpoint) is None:
                if proc.poll() is not None:
                    raise RuntimeError(f"runtime {replica_id} exited with {proc.returncode}; see {work}")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"runtime {replica_id} did not register within {start_timeout_s}s")
                await asyncio.sleep(0.1)
            address = f"127.0.0.1:{int(port_file.read_text())}"
            channel = grpc.aio.insecure_channel(address)
            started.append(RuntimeProcess(replica_id, proc, address,
                                          runtime_pb2_grpc.RuntimeServiceStub(channel), channel))
        yield started
    finally:
        for replica in started:
            await replica.channel.close()
        for proc, _ in procs.values():
            await asyncio.to_thread(terminate, proc, 10)
        for log in logs:
            log.close()
