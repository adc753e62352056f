"""Mid-stream failover with real runtime processes and the real model: a replica SIGKILLed (or SIGSTOPped) while it
streams to clients under concurrent load; every stream continues on the other replica and ends as one stream."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time

import aiohttp
import grpc
import pytest

from clowder.balancer.v1 import inference_pb2, inference_pb2_grpc
from clowder.runtime.v1 import runtime_pb2

from clowder_balancer.app import BalancerApp, create_balancer

from helpers.configs import balancer_config
from helpers.records import put_deployment
from helpers.runtimes import runtime_processes, RuntimeProcess
from helpers.sse import sse_events
from helpers.state import fresh_prefix, prefixed_state
from helpers.wait import wait_for

pytestmark = pytest.mark.processes

DEPLOYMENT = "f"
START_TIMEOUT_S = 90
CONCURRENT = 6
# Long enough that every stream is still running when its replica is killed after its first chunks.
MAX_TOKENS = 160
# Bound of one whole scenario's requests (two cores shared with other work: generous).
REQUESTS_TIMEOUT_S = 240


def story(i: int) -> list[dict]:
    return [{"role": "user", "content": f"Write a long, detailed story about a dragon who bakes bread. Story {i}."}]


@pytest.fixture
async def cluster(etcd, model_path, tmp_path):
    async with prefixed_state(etcd.endpoint, fresh_prefix("test-failover")) as state:
        await put_deployment(state, DEPLOYMENT, replicas=2)
        # A long lease: the killed replica stays registered, so only the balancer's own bookkeeping keeps
        # a stream from going back to it.
        async with runtime_processes(state, etcd.endpoint, DEPLOYMENT, ("r1", "r2"), model_path, tmp_path,
                                     start_timeout_s=START_TIMEOUT_S, extra_args=("--lease-ttl", "30")) as replicas:
            try:
                yield state, replicas
            finally:
                for replica in replicas:  # a stopped process cannot be terminated
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(replica.proc.pid, signal.SIGCONT)


@contextlib.asynccontextmanager
async def balancer(etcd, state, **overrides):
    settings = dict(ready_timeout_s=10, routing_profile="least-load")
    settings.update(overrides)
    app = await create_balancer(balancer_config(etcd.endpoint, state.prefix, **settings))
    await app.start()
    try:
        await wait_for(lambda: len(app.discovery.endpoints(DEPLOYMENT)) == 2, what="both endpoints")
        yield app
    finally:
        await app.stop()


class Stream:
    """One streamed chat over HTTP: its SSE events as they arrive."""

    def __init__(self) -> None:
        self.events: list[dict | str] = []
        self.chunks = 0
        self.status = 0

    async def run(self, session: aiohttp.ClientSession, app: BalancerApp, body: dict) -> Stream:
        url = f"http://127.0.0.1:{app.http_port}/v1/chat/completions"
        async with session.post(url, json={"model": DEPLOYMENT, "stream": True,
                                           "stream_options": {"include_usage": True}, **body}) as resp:
            self.status = resp.status
            buffer = ""
            async for data in resp.content.iter_any():
                buffer += data.decode()
                *complete, buffer = buffer.split("\n\n")
                for event in sse_events("\n\n".join(complete) + "\n\n"):
                    self.events.append(event)
                    if isinstance(event, dict) and any(c["delta"].get("content") for c in event.get("choices", ())):
                        self.chunks += 1
        return self

    def text(self, index: int = 0) -> str:
        return "".join(c["delta"].get("content") or "" for e in self.objects for c in e.get("choices", ())
                       if c["index"] == index)

    @property
    def objects(self) -> list[dict]:
        return [e for e in self.events if isinstance(e, dict)]

    @property
    def errors(self) -> list[dict]:
        return [e for e in self.objects if "error" in e]

    @property
    def usage(self) -> dict:
        return [e for e in self.objects if e.get("usage")][-1]["usage"]

    def finish_reasons(self) -> dict[int, str]:
        return {c["index"]: c["finish_reason"] for e in self.objects for c in e.get("choices", ())
                if c.get("finish_reason")}


def continuations(app: BalancerApp, outcome: str) -> float:
    return app.metrics.continuations.labels(DEPLOYMENT, outcome)._value.get()


def streaming_replica(app: BalancerApp, replicas: list[RuntimeProcess]) -> RuntimeProcess | None:
    """The replica with the most streams open through this balancer that has already sent tokens."""
    ttft = app.metrics.replica_ttft
    busy = [r for r in replicas if app.router.in_flight(r.address) > 0
            and ttft.labels(DEPLOYMENT, r.replica_id)._sum.get() > 0]
    return max(busy, key=lambda r: app.router.in_flight(r.address), default=None)


async def prompt_tokens(replica: RuntimeProcess, messages: list[dict]) -> int:
    request = runtime_pb2.GenerateRequest(
        request_id="count", sampling=runtime_pb2.SamplingParams(max_tokens=1),
        chat=runtime_pb2.ChatInput(messages=[runtime_pb2.ChatMessage(**m) for m in messages]))
    return [r async for r in replica.stub.Generate(request, timeout=60)][-1].usage.prompt_tokens


async def kill_when_streaming(app, replicas, streams: list[Stream], min_chunks: int, sig=signal.SIGKILL
                              ) -> RuntimeProcess:
    await wait_for(lambda: all(s.chunks >= min_chunks for s in streams), timeout=180,
                     what=f"every stream past {min_chunks} chunks")
    await wait_for(lambda: streaming_replica(app, replicas) is not None, timeout=30, what="a replica streaming")
    victim = streaming_replica(app, replicas)
    assert victim is not None
    os.kill(victim.proc.pid, sig)
    return victim


async def test_sigkill_mid_stream_under_concurrent_load_loses_no_stream(etcd, cluster):
    state, replicas = cluster
    async with balancer(etcd, state) as app, aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=REQUESTS_TIMEOUT_S)) as session:
        streams = [Stream() for _ in range(CONCURRENT)]
        tasks = [asyncio.create_task(s.run(session, app, {"messages": story(i), "max_tokens": MAX_TOKENS,
                                                          "temperature": 0.7, "seed": i}))
                 for i, s in enumerate(streams)]
        victim = await kill_when_streaming(app, replicas, streams, min_chunks=3)
        sent_before = [s.text() for s in streams]
        done_before = [bool(s.finish_reasons()) for s in streams]
        await asyncio.wait_for(asyncio.gather(*tasks), REQUESTS_TIMEOUT_S)
        survivor = next(r for r in replicas if r is not victim)
        expected_prompt = [await prompt_tokens(survivor, story(i)) for i in range(CONCURRENT)]
        resumed, failed = continuations(app, "resumed"), continuations(app, "failed")
    assert victim.proc.wait(10) == -signal.SIGKILL
    for i, stream in enumerate(streams):
        assert stream.status == 200
        assert not stream.errors, f"stream {i} broke: {stream.errors}"
        assert stream.events.count("[DONE]") == 1 and stream.events[-1] == "[DONE]"
        assert stream.text().startswith(sent_before[i])
        assert done_before[i] or len(stream.text()) > len(sent_before[i]), f"stream {i} did not go on after the kill"
        assert stream.finish_reasons()[0] in ("stop", "length")
        # Usage counts what the client received: its own prompt, and tokens within its max_tokens.
        assert stream.usage["prompt_tokens"] == expected_prompt[i]
        assert stream.chunks <= stream.usage["completion_tokens"] + 1 <= MAX_TOKENS + 1
    assert resumed >= 1 and failed == 0


async def test_sigkill_mid_stream_over_grpc_inference_service(etcd, cluster):
    state, replicas = cluster
    async with balancer(etcd, state) as app, grpc.aio.insecure_channel(f"127.0.0.1:{app.grpc_port}") as channel:
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        received: list[list[inference_pb2.CreateChatCompletionResponse]] = [[] for _ in range(4)]
        progress = [Stream() for _ in received]  # only their chunk counts, for kill_when_streaming

        async def one(i: int) -> None:
            request = inference_pb2.CreateChatCompletionRequest(
                model=DEPLOYMENT, messages=[runtime_pb2.ChatMessage(**m) for m in story(i)],
                sampling=runtime_pb2.SamplingParams(max_tokens=MAX_TOKENS, temperature=0.7, seed=i))
            async for chunk in stub.CreateChatCompletion(request, timeout=REQUESTS_TIMEOUT_S):
                received[i].append(chunk)
                progress[i].chunks += bool(chunk.delta)

        tasks = [asyncio.create_task(one(i)) for i in range(len(received))]
        await kill_when_streaming(app, replicas, progress, min_chunks=3)
        # Any broken stream would raise here (an RpcError) instead of ending.
        await asyncio.wait_for(asyncio.gather(*tasks), REQUESTS_TIMEOUT_S)
        assert continuations(app, "resumed") >= 1
    for chunks in received:
        last = chunks[-1]
        assert last.finish_reason in (runtime_pb2.FINISH_REASON_STOP, runtime_pb2.FINISH_REASON_LENGTH)
        assert 0 < last.usage.completion_tokens <= MAX_TOKENS
        assert sum(bool(c.finish_reason) for c in chunks) == 1
        assert "".join(c.delta for c in chunks).strip()


async def test_a_stopped_replica_is_left_after_the_stall_timeout_and_its_streams_continue(etcd, cluster):
    state, replicas = cluster
    stall_s = 3.0
    async with balancer(etcd, state, stream_idle_timeout_s=stall_s) as app, aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=REQUESTS_TIMEOUT_S)) as session:
        streams = [Stream() for _ in range(4)]
        tasks = [asyncio.create_task(s.run(session, app, {"messages": story(i), "max_tokens": MAX_TOKENS}))
                 for i, s in enumerate(streams)]
        victim = await kill_when_streaming(app, replicas, streams, min_chunks=3, sig=signal.SIGSTOP)
        stopped_at = time.monotonic()
        before = [s.chunks for s in streams]
        # Its streams go quiet, then come back from the other replica once the stall timeout passed.
        await wait_for(lambda: all(s.chunks > b for s, b in zip(streams, before)), timeout=120,
                         what="every stream moving again")
        await asyncio.wait_for(asyncio.gather(*tasks), REQUESTS_TIMEOUT_S)
        assert continuations(app, "resumed") >= 1
        assert time.monotonic() - stopped_at >= stall_s
    assert victim.proc.poll() is None, "a stall is not a death: the process is still there (stopped)"
    for stream in streams:
        assert not stream.errors and stream.events.count("[DONE]") == 1
        assert stream.finish_reasons()[0] in ("stop", "length")


async def test_n_choices_each_continue_after_their_replica_dies(etcd, cluster):
    state, replicas = cluster
    async with balancer(etcd, state) as app, aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=REQUESTS_TIMEOUT_S)) as session:
        stream = Stream()
        task = asyncio.create_task(stream.run(session, app, {"messages": story(0), "max_tokens": 120, "n": 3,
                                                             "temperature": 0.9, "seed": 11}))
        await kill_when_streaming(app, replicas, [stream], min_chunks=6)
        await asyncio.wait_for(task, REQUESTS_TIMEOUT_S)
        # The choices start on one replica (sharing its prompt cache), so each continued on its own.
        assert continuations(app, "resumed") >= 1
    assert not stream.errors and stream.events.count("[DONE]") == 1
    assert sorted(stream.finish_reasons()) == [0, 1, 2]
    assert all(stream.text(i).strip() for i in range(3))
    assert stream.usage["completion_tokens"] <= 3 * 120


async def test_a_greedy_stream_continued_elsewhere_reads_as_the_unbroken_one(etcd, cluster):
    """At temperature 0 the other replica continues the same tokens: the client gets what an unbroken stream
    would have given (same model, same token sequence in the context)."""
    state, replicas = cluster
    body = {"messages": [{"role": "user", "content": "Explain how bread is baked, step by step."}],
            "max_tokens": 64, "temperature": 0}
    async with balancer(etcd, state) as app, aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=REQUESTS_TIMEOUT_S)) as session:
        unbroken = await Stream().run(session, app, body)
        stream = Stream()
        task = asyncio.create_task(stream.run(session, app, body))
        await kill_when_streaming(app, replicas, [stream], min_chunks=10)
        await asyncio.wait_for(task, REQUESTS_TIMEOUT_S)
        assert continuations(app, "resumed") == 1
    assert not stream.errors
    assert stream.text() == unbroken.text()
    assert stream.usage["prompt_tokens"] == unbroken.usage["prompt_tokens"]


async def test_no_replica_left_ends_the_stream_with_an_error_event(etcd, cluster):
    state, replicas = cluster
    async with balancer(etcd, state, ready_timeout_s=3) as app, aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=REQUESTS_TIMEOUT_S)) as session:
        # One replica is gone already (still registered: its lease lasts 30 s); the stream lands on the other.
        os.kill(replicas[1].proc.pid, signal.SIGKILL)
        stream = Stream()
        task = asyncio.create_task(stream.run(session, app, {"messages": story(0), "max_tokens": MAX_TOKENS}))
        await wait_for(lambda: stream.chunks >= 3, timeout=120, what="the stream started")
        os.kill(replicas[0].proc.pid, signal.SIGKILL)
        await asyncio.wait_for(task, 60)
        assert continuations(app, "failed") == 1
    assert stream.text(), "what was sent before stays sent"
    assert len(stream.errors) == 1 and stream.errors[0]["error"]["type"] == "server_error"
    assert stream.events.count("[DONE]") == 1 and stream.events[-1] == "[DONE]"
