"""Real `clowder_runtime` processes serving the bundled model, registered in etcd as the controller would start them,
and a balancer in front of them."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import pathlib
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterable

import grpc
import openai

from clowder.runtime.v1 import runtime_pb2, runtime_pb2_grpc
from clowder_balancer.app import BalancerApp, create_balancer
from clowder_common import keys
from clowder_common.etcd import EtcdState
from clowder_common.processes import spawn, terminate
from helpers.configs import balancer_config
from helpers.wait import wait_for


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


@contextlib.asynccontextmanager
async def balancer_over(etcd_endpoint: str, prefix: str, endpoints: dict[str, int],
                        **overrides) -> AsyncIterator[BalancerApp]:
    """A started balancer (in this process) once it sees `endpoints[deployment]` replicas of each deployment."""
    app = await create_balancer(balancer_config(etcd_endpoint, prefix, **overrides))
    await app.start()
    try:
        for deployment, count in endpoints.items():
            await wait_for(lambda d=deployment, n=count: len(app.discovery.endpoints(d)) == n, 20,
                           f"{count} endpoint(s) of {deployment}")
        yield app
    finally:
        await app.stop()


@contextlib.asynccontextmanager
async def openai_client(balancer: BalancerApp, timeout: float = 60) -> AsyncIterator[openai.AsyncOpenAI]:
    """The official openai client on the balancer's HTTP port, without retries (a test sees every failure)."""
    async with openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{balancer.http_port}/v1", api_key="unused",
                                  max_retries=0, timeout=timeout) as client:
        yield client
