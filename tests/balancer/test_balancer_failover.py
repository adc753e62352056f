"""Failover with real runtime processes: SIGKILL one replica under concurrent load; no request that had not
started streaming is lost, and those that had end with an error event."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
import uuid

import openai
import pytest

from clowder.runtime.v1 import runtime_pb2
from clowder_common import keys
from clowder_common.etcd import EtcdState
from clowder_common.processes import spawn, terminate

from clowder_balancer.app import create_balancer

from balancer_helpers import balancer_config, put_deployment, wait_until

DEPLOYMENT = "f"
START_TIMEOUT_S = 90
CONCURRENT = 10


@pytest.fixture
async def two_runtimes(etcd, model_path, tmp_path):
    state = EtcdState([etcd.endpoint], f"/test-failover-{uuid.uuid4().hex[:8]}/")
    await state.connect()
    await put_deployment(state, DEPLOYMENT, replicas=2)
    procs, logs = {}, []
    try:
        for replica_id in ("r1", "r2"):
            log = open(tmp_path / f"{replica_id}.log", "wb")
            logs.append(log)
            procs[replica_id] = spawn([
                sys.executable, "-m", "clowder_runtime", "--model-path", str(model_path), "--listen", "127.0.0.1:0",
                "--deployment", DEPLOYMENT, "--replica-id", replica_id, "--etcd-endpoints", etcd.endpoint,
                "--etcd-prefix", state.prefix, "--threads", "1", "--lease-ttl", "30",
            ], log)
        deadline = time.monotonic() + START_TIMEOUT_S
        for replica_id, proc in procs.items():
            key = state.key(keys.endpoint(DEPLOYMENT, replica_id))
            while await state.get(key, runtime_pb2.Endpoint) is None:
                assert proc.poll() is None, f"runtime {replica_id} exited; see {tmp_path}"
                assert time.monotonic() < deadline, f"runtime {replica_id} did not register"
                await asyncio.sleep(0.1)
        yield state, procs
    finally:
        for proc in procs.values():
            await asyncio.to_thread(terminate, proc, 10)
        for log in logs:
            log.close()
        await state.delete_prefix(state.prefix)
        await state.close()


async def test_killing_a_replica_mid_load_loses_no_request_that_had_not_started_streaming(etcd, two_runtimes):
    state, procs = two_runtimes
    app = await create_balancer(balancer_config(etcd.endpoint, state.prefix, ready_timeout_s=10,
                                                routing_profile="least-load"))
    await app.start()
    try:
        await wait_until(lambda: len(app.discovery.endpoints(DEPLOYMENT)) == 2, what="both endpoints")
        async with openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{app.http_port}/v1", api_key="unused",
                                      max_retries=0, timeout=120) as client:
            streaming = asyncio.Event()

            async def one(i: int) -> tuple[int, str | None]:
                chunks = 0
                try:
                    stream = await client.chat.completions.create(
                        model=DEPLOYMENT, messages=[{"role": "user", "content": f"Count to twenty, try {i}."}],
                        max_tokens=40, temperature=0, stream=True,
                    )
                    async for _ in stream:
                        chunks += 1
                        if chunks >= 3:
                            streaming.set()
                    return chunks, None
                except openai.APIError as err:
                    return chunks, str(err)

            tasks = [asyncio.create_task(one(i)) for i in range(CONCURRENT)]
            await asyncio.wait_for(streaming.wait(), 90)
            # The victim streams to some of our clients right now and may hold others in its queue.
            ttft = app.metrics.replica_ttft

            def streaming_replicas() -> list[str]:
                return [e.replica_id for e in app.discovery.endpoints(DEPLOYMENT)
                        if app.router.in_flight(e.address) > 0
                        and ttft.labels(DEPLOYMENT, e.replica_id)._sum.get() > 0]

            await wait_until(streaming_replicas, timeout=60, what="a replica streaming")
            victim = streaming_replicas()[0]
            os.kill(procs[victim].pid, signal.SIGKILL)
            results = await asyncio.wait_for(asyncio.gather(*tasks), 120)
    finally:
        await app.stop()
    lost = [(chunks, error) for chunks, error in results if error is not None and chunks == 0]
    assert not lost, f"requests failed before streaming anything: {lost}"
    # Those cut mid-stream saw chunks first, then the in-band error; everyone else finished.
    assert all(chunks > 0 for chunks, _ in results)
    assert sum(error is None for _, error in results) >= CONCURRENT // 2
