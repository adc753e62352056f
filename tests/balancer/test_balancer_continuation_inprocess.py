"""Mid-stream failover of an in-process balancer in front of scripted runtimes: breaks on cue (a reset, a stall,
no replica left), checked over HTTP and gRPC. The same with real runtimes killed for real is in
test_balancer_failover.py."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from clowder.balancer.v1 import inference_pb2, inference_pb2_grpc
from clowder.runtime.v1 import runtime_pb2
from clowder_common import keys
from clowder_common.errors import Internal, Unavailable

from helpers.records import put_endpoint
from helpers.sse import sse_events
from helpers.wait import wait_for
from test_balancer_routing_inprocess import cluster

pytestmark = pytest.mark.inprocess

PROMPT_TOKENS = 9
ANSWER = ["One,", " two,", " three,", " four."]


def message(text: str, tokens: int, prompt_tokens: int) -> runtime_pb2.GenerateResponse:
    return runtime_pb2.GenerateResponse(text=text, completion_tokens=tokens, prompt_tokens=prompt_tokens)


def breaks_after(sent: int, error: Exception | None = None, stall: bool = False):
    """A runtime that answers ANSWER one token a message: a fresh request breaks after `sent` messages (with
    `error`, or by stalling; len(ANSWER) never breaks); a continuation (assistant_prefix or a prompt that
    grew) picks up where the prefix ends and finishes."""

    async def behaviour(request, context):
        prefix = request.chat.assistant_prefix if request.HasField("chat") else request.prompt.removeprefix("Go:")
        done = _tokens_in(prefix)
        prompt_tokens = PROMPT_TOKENS + done
        if done == 0 and sent < len(ANSWER):
            for i in range(sent):
                yield message(ANSWER[i], i + 1, prompt_tokens)
                await asyncio.sleep(0.01)
            if stall:
                await asyncio.sleep(60)
            raise error or Unavailable("gone")
        produced = 0
        for text in ANSWER[done:]:
            produced += 1
            yield message(text, produced, prompt_tokens)
        last = message("", produced, prompt_tokens)
        last.finish_reason = runtime_pb2.FINISH_REASON_STOP
        last.usage.CopyFrom(runtime_pb2.Usage(prompt_tokens=prompt_tokens, completion_tokens=produced,
                                              cached_prompt_tokens=prompt_tokens - 1))
        yield last

    return behaviour


def _tokens_in(prefix: str) -> int:
    """How many ANSWER pieces `prefix` holds."""
    count, text = 0, ""
    while count < len(ANSWER) and text + ANSWER[count] <= prefix and prefix.startswith(text + ANSWER[count]):
        text += ANSWER[count]
        count += 1
    assert text == prefix, f"a continuation must start at a piece boundary: {prefix!r}"
    return count


async def stream_chat(http, app, model="d", **extra) -> list[dict | str]:
    url = f"http://127.0.0.1:{app.http_port}/v1/chat/completions"
    body = {"model": model, "messages": [{"role": "user", "content": "Count."}], "stream": True,
            "stream_options": {"include_usage": True}, "max_tokens": 20, **extra}
    async with http.post(url, json=body) as resp:
        assert resp.status == 200
        return sse_events(await resp.text())


def content(chunks: list[dict | str], index: int = 0) -> str:
    return "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks
                   if isinstance(c, dict) and c.get("choices") and c["choices"][0]["index"] == index)


def metric(app, outcome: str) -> float:
    return app.metrics.continuations.labels("d", outcome)._value.get()


async def test_a_chat_stream_broken_mid_way_continues_on_the_other_replica(state, make_balancer, runtimes, http):
    app, rts = await cluster(state, make_balancer, runtimes, [breaks_after(2)] * 2)
    chunks = await stream_chat(http, app, seed=7)
    assert chunks.count("[DONE]") == 1 and chunks[-1] == "[DONE]"
    assert not any(isinstance(c, dict) and "error" in c for c in chunks)
    assert content(chunks) == "One, two, three, four."
    usage = chunks[-2]["usage"]
    # The client's prompt, the tokens it got from both replicas; cached no more than its prompt.
    assert (usage["prompt_tokens"], usage["completion_tokens"]) == (PROMPT_TOKENS, 4)
    assert usage["prompt_tokens_details"]["cached_tokens"] <= PROMPT_TOKENS
    first, second = sorted(rts, key=lambda r: len(r.requests[0].chat.assistant_prefix) if r.requests else 99)
    assert len(first.requests) == len(second.requests) == 1, "each replica once: never the broken one again"
    continued = second.requests[0]
    assert continued.chat.assistant_prefix == "One, two,"
    assert continued.sampling.max_tokens == 18
    assert continued.sampling.seed != 7 and list(continued.chat.messages) == list(first.requests[0].chat.messages)
    assert metric(app, "resumed") == 1


async def test_a_stalled_stream_is_cancelled_and_continued_elsewhere(state, make_balancer, runtimes, http):
    app, rts = await cluster(state, make_balancer, runtimes, [breaks_after(1, stall=True)] * 2,
                             stream_idle_timeout_s=0.5)
    loop = asyncio.get_running_loop()
    started = loop.time()
    chunks = await stream_chat(http, app)
    assert loop.time() - started < 10
    assert content(chunks) == "One, two, three, four." and chunks.count("[DONE]") == 1
    await wait_for(lambda: sum(r.cancelled for r in rts) == 1, what="the stalled call cancelled")


async def test_a_completion_and_a_non_streamed_chat_continue_too(state, make_balancer, runtimes, http):
    app, rts = await cluster(state, make_balancer, runtimes, [breaks_after(3, Internal("reset"))] * 2)
    url = f"http://127.0.0.1:{app.http_port}/v1/completions"
    async with http.post(url, json={"model": "d", "prompt": "Go:", "max_tokens": 10}) as resp:
        assert resp.status == 200
        body = await resp.json()
    assert body["choices"][0]["text"] == "One, two, three, four."
    assert body["usage"]["prompt_tokens"] == PROMPT_TOKENS and body["usage"]["completion_tokens"] == 4
    prompts = sorted(r.requests[0].prompt for r in rts if r.requests)
    assert prompts == ["Go:", "Go:One, two, three,"]
    url = f"http://127.0.0.1:{app.http_port}/v1/chat/completions"
    async with http.post(url, json={"model": "d", "messages": [{"role": "user", "content": "Count."}]}) as resp:
        assert resp.status == 200
        body = await resp.json()
    assert body["choices"][0]["message"]["content"] == "One, two, three, four."
    assert body["choices"][0]["finish_reason"] == "stop"


async def test_each_of_n_choices_continues_on_its_own(state, make_balancer, runtimes, http):
    app, rts = await cluster(state, make_balancer, runtimes, [breaks_after(2)] * 3)
    chunks = await stream_chat(http, app, n=2)
    assert content(chunks, 0) == content(chunks, 1) == "One, two, three, four."
    assert chunks.count("[DONE]") == 1
    assert chunks[-2]["usage"]["completion_tokens"] == 8
    assert metric(app, "resumed") == 2


async def test_grpc_inference_service_continues_a_broken_stream(state, make_balancer, runtimes):
    app, _ = await cluster(state, make_balancer, runtimes, [breaks_after(2)] * 2)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.grpc_port}") as channel:
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        request = inference_pb2.CreateChatCompletionRequest(
            model="d", messages=[runtime_pb2.ChatMessage(role="user", content="Count.")],
            sampling=runtime_pb2.SamplingParams(max_tokens=20))
        chunks = [c async for c in stub.CreateChatCompletion(request, timeout=20)]
    assert "".join(c.delta for c in chunks) == "One, two, three, four."
    assert chunks[-1].usage.prompt_tokens == PROMPT_TOKENS and chunks[-1].usage.completion_tokens == 4


async def test_no_replica_left_ends_with_an_error_event(state, make_balancer, runtimes, http):
    app, rts = await cluster(state, make_balancer, runtimes, [breaks_after(2)], ready_timeout_s=0.5)
    chunks = await stream_chat(http, app)
    assert content(chunks) == "One, two,"
    errors = [c for c in chunks if isinstance(c, dict) and "error" in c]
    assert len(errors) == 1 and errors[0]["error"]["type"] == "server_error"
    assert chunks.count("[DONE]") == 1 and chunks[-1] == "[DONE]"
    assert len(rts[0].requests) == 1, "the broken replica is not tried again"
    assert metric(app, "failed") == 1


async def test_json_output_and_max_continuations_zero_are_not_continued(state, make_balancer, runtimes, http):
    app, rts = await cluster(state, make_balancer, runtimes, [breaks_after(2)] * 2)
    chunks = await stream_chat(http, app, response_format={"type": "json_object"})
    assert any(isinstance(c, dict) and "error" in c for c in chunks)
    assert sum(len(r.requests) for r in rts) == 1
    assert metric(app, "refused") == 1

    off, off_rts = await cluster(state, make_balancer, runtimes, [breaks_after(2)] * 2, deployment="e",
                                 max_continuations=0)
    chunks = await stream_chat(http, off, model="e")
    assert any(isinstance(c, dict) and "error" in c for c in chunks)
    assert sum(len(r.requests) for r in off_rts) == 1


async def test_a_model_whose_endpoints_left_etcd_is_served_by_them_for_the_grace_period(
        state, make_balancer, runtimes, http):
    """An etcd outage longer than the lease TTL: a fresh read shows no endpoint, though the runtimes serve on."""
    # No stats polls and turns in order: a request is sure to meet the dead fallback (polls would steer clear).
    app, rts = await cluster(state, make_balancer, runtimes, [breaks_after(len(ANSWER))] * 2, endpoint_grace_s=30,
                             stats_interval_s=0, routing_profile="round-robin")
    for i in range(2):
        await state.delete(state.key(keys.endpoint("d", f"r{i}")))
    await wait_for(lambda: not app.discovery.registered_endpoints("d"), what="endpoints gone")
    assert {e.address for e in app.discovery.endpoints("d")} == {r.address for r in rts}
    # r0 went away for real: one refused connection drops it, and the request goes to r1.
    await rts[0].stop()
    url = f"http://127.0.0.1:{app.http_port}/v1/chat/completions"
    for _ in range(3):
        async with http.post(url, json={"model": "d", "messages": [{"role": "user", "content": "Count."}],
                                        "max_tokens": 5}) as resp:
            assert resp.status == 200
    assert [e.address for e in app.discovery.endpoints("d")] == [rts[1].address]
    # Registered endpoints win over fallbacks at once.
    third = await runtimes(breaks_after(len(ANSWER)))
    await put_endpoint(state, "d", "r9", third.address)
    await wait_for(lambda: [e.address for e in app.discovery.endpoints("d")] == [third.address],
                     what="the registered endpoint only")


async def test_fallback_endpoints_expire_after_the_grace_period(state, make_balancer, runtimes, http):
    app, rts = await cluster(state, make_balancer, runtimes, [breaks_after(len(ANSWER))], endpoint_grace_s=0.5,
                             ready_timeout_s=0.2)
    await state.delete(state.key(keys.endpoint("d", "r0")))
    await wait_for(lambda: not app.discovery.registered_endpoints("d"), what="endpoint gone")
    assert app.discovery.endpoints("d")
    await wait_for(lambda: not app.discovery.endpoints("d"), what="fallback expired")
    url = f"http://127.0.0.1:{app.http_port}/v1/chat/completions"
    async with http.post(url, json={"model": "d", "messages": [{"role": "user", "content": "Count."}]}) as resp:
        assert resp.status == 503


async def test_a_replica_that_withdrew_its_endpoint_gets_no_new_request_while_another_is_registered(
        state, make_balancer, runtimes, http):
    """A graceful shutdown revokes the lease: the fallback must not keep traffic going there."""
    app, rts = await cluster(state, make_balancer, runtimes, [breaks_after(len(ANSWER))] * 2, endpoint_grace_s=30)
    await state.delete(state.key(keys.endpoint("d", "r0")))
    await wait_for(lambda: [e.address for e in app.discovery.endpoints("d")] == [rts[1].address],
                     what="r0 gone from routing")
    url = f"http://127.0.0.1:{app.http_port}/v1/chat/completions"
    for _ in range(5):
        async with http.post(url, json={"model": "d", "messages": [{"role": "user", "content": "Count."}]}) as resp:
            assert resp.status == 200
    assert (len(rts[0].requests), len(rts[1].requests)) == (0, 5)
