"""The balancer in front of two real runtime processes (SmolLM2 on llama.cpp), driven by the official openai client.

The last test SIGKILLs a replica; it stays last so the others see both.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time

import grpc
import httpx
import openai
import pytest

from clowder.balancer.v1 import inference_pb2, inference_pb2_grpc
from clowder.runtime.v1 import runtime_pb2
from clowder_common import keys

from helpers.records import put_deployment
from helpers.runtimes import balancer_over, openai_client, runtime_processes, RuntimeProcess
from helpers.state import fresh_prefix, prefixed_state

pytestmark = pytest.mark.processes

DEPLOYMENT = "d"
REPLICAS = ("r1", "r2")
CHAT = [{"role": "user", "content": "Name three colors."}]


@pytest.fixture(scope="module")
async def cluster_state(etcd):
    async with prefixed_state(etcd.endpoint, fresh_prefix("test-balancer")) as state:
        await put_deployment(state, DEPLOYMENT, replicas=len(REPLICAS))
        yield state


@pytest.fixture(scope="module")
async def replicas(etcd, cluster_state, model_path, tmp_path_factory):
    work = tmp_path_factory.mktemp("runtimes")
    async with runtime_processes(cluster_state, etcd.endpoint, DEPLOYMENT, REPLICAS, model_path, work) as started:
        yield started


@pytest.fixture(scope="module")
async def balancer(etcd, cluster_state, replicas):
    async with balancer_over(etcd.endpoint, cluster_state.prefix, {DEPLOYMENT: len(REPLICAS)}, ready_timeout_s=5) as app:
        yield app


@pytest.fixture(scope="module")
async def client(balancer):
    async with openai_client(balancer) as client:
        yield client


async def _running(replicas: list[RuntimeProcess]) -> list[int]:
    return [(await r.stats()).num_requests_running for r in replicas]


async def test_models_lists_the_deployment(client):
    models = await client.models.list()
    assert [m.id for m in models.data] == [DEPLOYMENT]
    assert models.data[0].owned_by == "clowder"


async def test_chat_and_completion_report_usage(client):
    chat = await client.chat.completions.create(model=DEPLOYMENT, messages=CHAT, max_tokens=12, temperature=0)
    assert chat.object == "chat.completion"
    assert chat.choices[0].message.role == "assistant"
    assert chat.choices[0].message.content
    assert chat.choices[0].finish_reason in ("stop", "length")
    assert 0 < chat.usage.completion_tokens <= 12 and chat.usage.prompt_tokens > 0
    assert chat.usage.total_tokens == chat.usage.prompt_tokens + chat.usage.completion_tokens

    completion = await client.completions.create(model=DEPLOYMENT, prompt="The sky is", max_tokens=8, temperature=0)
    assert completion.object == "text_completion"
    assert completion.choices[0].text
    assert completion.usage.completion_tokens <= 8
    assert completion.usage.total_tokens == completion.usage.prompt_tokens + completion.usage.completion_tokens


async def test_streamed_chat_equals_the_non_streamed_text(client):
    params = dict(model=DEPLOYMENT, messages=CHAT, max_tokens=24, temperature=0, seed=7)
    whole = await client.chat.completions.create(**params)
    stream = await client.chat.completions.create(**params, stream=True, stream_options={"include_usage": True})
    chunks = [chunk async for chunk in stream]
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


async def test_unknown_model_is_not_found(client):
    with pytest.raises(openai.NotFoundError) as info:
        await client.chat.completions.create(model="no-such-model", messages=CHAT)
    assert info.value.code == "model_not_found"


async def test_bad_requests_are_400_in_openai_shape(client, balancer):
    async with httpx.AsyncClient(timeout=10) as http:
        resp = await http.post(
            f"http://127.0.0.1:{balancer.http_port}/v1/chat/completions",
            content=b'{"model": "d", "messages": [', headers={"Content-Type": "application/json"},
        )
    assert resp.status_code == 400
    assert set(resp.json()["error"]) == {"message", "type", "param", "code"}
    assert resp.json()["error"]["type"] == "invalid_request_error"
    assert resp.headers["x-request-id"]
    with pytest.raises(openai.BadRequestError) as info:
        await client.chat.completions.create(model=DEPLOYMENT, messages=CHAT, n=17)
    assert info.value.param == "n"
    # Refused by the runtime itself (the balancer lets an empty prompt through): its field becomes `param`.
    with pytest.raises(openai.BadRequestError) as info:
        await client.completions.create(model=DEPLOYMENT, prompt="", max_tokens=4)
    assert info.value.param == "prompt"


async def test_concurrent_requests_spread_over_both_replicas(client, replicas):
    before = [(await r.stats()).requests_total for r in replicas]
    await asyncio.gather(*(
        client.chat.completions.create(model=DEPLOYMENT, messages=CHAT, max_tokens=8, temperature=0)
        for _ in range(4)
    ))
    after = [(await r.stats()).requests_total for r in replicas]
    # Least-in-flight sends the 2nd request to the idle replica and so on: 2 each, where random would often not.
    assert [a - b for a, b in zip(after, before)] == [2, 2]


async def test_client_disconnect_cancels_the_generation(client, replicas):
    stream = await client.completions.create(
        model=DEPLOYMENT, prompt="1, 2, 3, 4, 5,", max_tokens=1500, temperature=0, stream=True
    )
    received = 0
    async for chunk in stream:
        received += 1 if chunk.choices and chunk.choices[0].text else 0
        if received >= 3:
            break
    assert sum(await _running(replicas)) == 1
    await stream.close()
    started = time.monotonic()
    while sum(await _running(replicas)) != 0:
        assert time.monotonic() - started < 3, "the runtime kept generating after the client left"
        await asyncio.sleep(0.05)


async def test_grpc_streaming_chat_and_not_found(balancer):
    async with grpc.aio.insecure_channel(f"127.0.0.1:{balancer.grpc_port}") as channel:
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        request = inference_pb2.CreateChatCompletionRequest(
            model=DEPLOYMENT,
            messages=[runtime_pb2.ChatMessage(role="user", content="Say hello.")],
            sampling=runtime_pb2.SamplingParams(max_tokens=10, temperature=0),
        )
        chunks = [c async for c in stub.CreateChatCompletion(request, timeout=60)]
        assert "".join(c.delta for c in chunks)
        assert chunks[-1].finish_reason in (runtime_pb2.FINISH_REASON_STOP, runtime_pb2.FINISH_REASON_LENGTH)
        assert 0 < chunks[-1].usage.completion_tokens <= 10
        assert {c.model for c in chunks} == {DEPLOYMENT} and len({c.id for c in chunks}) == 1
        with pytest.raises(grpc.aio.AioRpcError) as info:
            async for _ in stub.CreateChatCompletion(
                inference_pb2.CreateChatCompletionRequest(model="nope", messages=request.messages), timeout=10
            ):
                pass
        assert info.value.code() == grpc.StatusCode.NOT_FOUND


async def test_json_response_format_and_cached_prefix_through_the_balancer(client):
    messages = [{"role": "system", "content": "You describe things as JSON objects. " * 20},
                {"role": "user", "content": "Describe a cat."}]
    first = await client.chat.completions.create(
        model=DEPLOYMENT, messages=messages, max_tokens=48, temperature=0, response_format={"type": "json_object"},
        extra_headers={"x-session-id": "json-cat"},
    )
    text = first.choices[0].message.content
    assert text.lstrip().startswith("{"), text
    # The same conversation again, pinned to the same replica: its KV cache serves most of the prompt.
    again = await client.chat.completions.create(
        model=DEPLOYMENT, messages=messages, max_tokens=4, temperature=0, extra_headers={"x-session-id": "json-cat"},
    )
    assert again.usage.prompt_tokens_details.cached_tokens > again.usage.prompt_tokens // 2


async def test_killed_replica_s_stream_continues_on_the_other_which_takes_new_requests_too(
    client, balancer, replicas, cluster_state
):
    stream = await client.chat.completions.create(
        model=DEPLOYMENT, messages=[{"role": "user", "content": "Write a long story."}],
        # Short: the rest of the test needs the dead replica still registered (its lease lasts 5 s).
        max_tokens=30, temperature=1, stream=True,
    )
    chunks, finish = 0, None
    async for chunk in stream:  # an in-band error event would raise openai.APIError here
        chunks += 1
        finish = chunk.choices[0].finish_reason if chunk.choices else finish
        if chunks == 3:
            busy = [r for r, n in zip(replicas, await _running(replicas)) if n == 1]
            assert len(busy) == 1
            victim = busy[0]
            os.kill(victim.proc.pid, signal.SIGKILL)
    # The other replica continued the stream (see test_balancer_failover.py for the thorough version).
    assert chunks > 3 and finish in ("stop", "length")
    assert balancer.metrics.continuations.labels(DEPLOYMENT, "resumed")._value.get() >= 1
    await asyncio.to_thread(victim.proc.wait, 10)
    key = cluster_state.key(keys.endpoint(DEPLOYMENT, victim.replica_id))
    assert await cluster_state.get(key, runtime_pb2.Endpoint) is not None, "lease expired too soon for this test"

    retries_before = balancer.metrics.retries.labels(DEPLOYMENT)._value.get()
    routed_before = balancer.metrics.routed.labels(DEPLOYMENT, victim.replica_id)._value.get()
    # Two at once, while the dead replica's endpoint is still registered.
    results = await asyncio.gather(*(
        client.chat.completions.create(model=DEPLOYMENT, messages=CHAT, max_tokens=8, temperature=0)
        for _ in range(2)
    ))
    assert all(r.choices[0].message.content for r in results)
    # Routing either already knew (the broken stream ejected it, its stats polls fail) and sent nothing
    # there, or retried every call that went there elsewhere: no client saw the dead replica.
    retried = balancer.metrics.retries.labels(DEPLOYMENT)._value.get() - retries_before
    routed_to_victim = balancer.metrics.routed.labels(DEPLOYMENT, victim.replica_id)._value.get() - routed_before
    assert retried == routed_to_victim
