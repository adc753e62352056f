"""The aimage's middleware on the newer OpenAI surface: embeddings (access, rate limit, blocklist, audit),
n choices, logprobs and tool calls under output filters. In-process balancer, scripted runtime."""

from __future__ import annotations

import asyncio
import json

import pytest

from clowder.runtime.v1 import runtime_pb2
from clowder_common.errors import Unavailable

from balancer_helpers import final
from helpers.wait import wait_for
from test_balancer_apikeys_middleware import create_key, middleware, put_image, setup

pytestmark = pytest.mark.inprocess


async def post(http, app, path: str, body: dict, key: str | None = None):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    resp = await http.post(f"http://127.0.0.1:{app.http_port}{path}", json=body, headers=headers)
    return resp.status, await resp.json()


def embed_body(*texts: str) -> dict:
    return {"model": "d", "input": list(texts)}


async def test_embeddings_pass_group_access_control(state, make_balancer, runtimes, http):
    app, runtime = await setup(state, make_balancer, runtimes, configuration=middleware(groups=("research",)))
    insider, outsider = await create_key(app, "research"), await create_key(app, "sales")
    await wait_for(lambda: len(app.api_keys.cache.items) == 2, what="keys")
    status, body = await post(http, app, "/v1/embeddings", embed_body("a b", "c"), insider)
    assert status == 200
    assert [d["embedding"] for d in body["data"]] == [[3.0, 2.0], [1.0, 1.0]]
    assert body["usage"] == {"prompt_tokens": 3, "total_tokens": 3}
    status, body = await post(http, app, "/v1/embeddings", embed_body("a"), outsider)
    assert status == 403 and body["error"]["code"] == "group_not_allowed"
    assert (await post(http, app, "/v1/embeddings", embed_body("a")))[0] == 401
    assert len(runtime.requests) == 1


async def test_embeddings_count_against_the_rate_limit(state, make_balancer, runtimes, http):
    config = middleware({"name": "rate-limit", "options": {"requests_per_minute": 2}})
    app, _ = await setup(state, make_balancer, runtimes, configuration=config)
    key = await create_key(app)
    await wait_for(lambda: len(app.api_keys.cache.items) == 1, what="key")
    statuses = [(await post(http, app, "/v1/embeddings", embed_body("x"), key))[0],
                (await post(http, app, "/v1/chat/completions", {"model": "d", "messages": [
                    {"role": "user", "content": "hi"}]}, key))[0],
                (await post(http, app, "/v1/embeddings", embed_body("x"), key))[0]]
    assert statuses == [200, 200, 429]


async def test_blocklist_refuses_embedding_inputs_and_the_audit_log_records_them(
        state, make_balancer, runtimes, http, tmp_path):
    audit = tmp_path / "audit.jsonl"
    config = middleware({"name": "blocklist", "options": {"patterns": ["swordfish"]}},
                        {"name": "audit", "options": {"path": str(audit)}})
    app, runtime = await setup(state, make_balancer, runtimes, configuration=config)
    status, body = await post(http, app, "/v1/embeddings", embed_body("fine", "a SWORDFISH here"))
    assert status == 400 and body["error"]["param"] == "input[1]" and body["error"]["code"] == "content_blocked"
    assert runtime.requests == []
    assert (await post(http, app, "/v1/embeddings", embed_body("two words")))[0] == 200
    await app.pipeline.drain()
    lines = [json.loads(line) for line in audit.read_text().splitlines()]
    assert [(e["status"], e["prompt_tokens"]) for e in lines] == [(400, 0), (200, 2)]
    assert lines[1]["request"] == {"inputs": ["two words"]}


async def test_logprobs_are_refused_when_the_output_is_filtered(state, make_balancer, runtimes, http):
    config = middleware({"name": "blocklist", "options": {"patterns": ["swordfish"]}})
    app, runtime = await setup(state, make_balancer, runtimes, configuration=config)
    status, body = await post(http, app, "/v1/chat/completions", {
        "model": "d", "messages": [{"role": "user", "content": "hi"}], "logprobs": True})
    assert status == 400 and body["error"]["param"] == "logprobs"
    assert runtime.requests == []


async def test_tool_call_arguments_pass_the_output_filter(state, make_balancer, runtimes, http):
    async def call_tool(request, context):
        yield runtime_pb2.GenerateResponse(
            finish_reason=runtime_pb2.FINISH_REASON_TOOL_CALLS,
            usage=runtime_pb2.Usage(prompt_tokens=3, completion_tokens=9),
            tool_calls=[runtime_pb2.ToolCall(id="call_1", name="lookup", arguments='{"q": "the swordfish code"}')])

    config = middleware({"name": "blocklist", "options": {"patterns": ["swordfish"]}})
    app, _ = await setup(state, make_balancer, runtimes, behaviour=call_tool, configuration=config)
    status, body = await post(http, app, "/v1/chat/completions", {
        "model": "d", "messages": [{"role": "user", "content": "hi"}],
        "tools": [{"type": "function", "function": {"name": "lookup"}}]})
    assert status == 200
    [call] = body["choices"][0]["message"]["tool_calls"]
    assert json.loads(call["function"]["arguments"]) == {"q": "the [blocked] code"}
    assert body["choices"][0]["finish_reason"] == "tool_calls"


@pytest.mark.parametrize("stream", [False, True])
async def test_n_choices_count_once_against_the_rate_limit_and_tokens_add_up(
        state, make_balancer, runtimes, http, tmp_path, stream):
    async def answer(request, context):
        yield runtime_pb2.GenerateResponse(text=f"seed {request.sampling.seed}")
        yield final(prompt_tokens=5, completion_tokens=2)

    audit = tmp_path / "audit.jsonl"
    config = middleware({"name": "rate-limit", "options": {"requests_per_minute": 1}},
                        {"name": "audit", "options": {"path": str(audit)}})
    app, runtime = await setup(state, make_balancer, runtimes, behaviour=answer, configuration=config)
    body = {"model": "d", "messages": [{"role": "user", "content": "hi"}], "n": 3, "seed": 40, "stream": stream}
    resp = await http.post(f"http://127.0.0.1:{app.http_port}/v1/chat/completions", json=body)
    assert resp.status == 200
    if stream:
        texts = {}
        for line in (await resp.text()).splitlines():
            if line.startswith("data: {"):
                for c in json.loads(line[6:])["choices"]:
                    texts[c["index"]] = texts.get(c["index"], "") + (c["delta"].get("content") or "")
        assert texts == {0: "seed 40", 1: "seed 41", 2: "seed 42"}
    else:
        result = await resp.json()
        assert [c["message"]["content"] for c in result["choices"]] == ["seed 40", "seed 41", "seed 42"]
        assert result["usage"]["prompt_tokens"] == 5 and result["usage"]["completion_tokens"] == 6
    assert len(runtime.requests) == 3
    assert (await post(http, app, "/v1/chat/completions", {**body, "stream": False}))[0] == 429
    await app.pipeline.drain()
    entry = json.loads(audit.read_text().splitlines()[0])
    assert entry["status"] == 200 and (entry["prompt_tokens"], entry["completion_tokens"]) == (5, 6)
    # Every choice's answer is on record, not only the first.
    assert entry["output"] == "seed 40"
    assert [(c["index"], c["output"], c["finish_reason"]) for c in entry["choices"]] == [
        (0, "seed 40", "stop"), (1, "seed 41", "stop"), (2, "seed 42", "stop")]


async def test_a_changed_middleware_configuration_applies_to_the_next_request(state, make_balancer, runtimes, http):
    limited = middleware({"name": "rate-limit", "options": {"requests_per_minute": 1}})
    app, _ = await setup(state, make_balancer, runtimes, configuration=limited)
    chat = {"model": "d", "messages": [{"role": "user", "content": "hi"}]}
    assert [(await post(http, app, "/v1/chat/completions", chat))[0] for _ in range(2)] == [200, 429]
    unlimited = middleware({"name": "system-prompt", "options": {"text": "Be brief."}})
    await put_image(state, "d", unlimited)
    await wait_for(lambda: app.discovery.image_configuration("d") == unlimited, what="new image")
    assert (await post(http, app, "/v1/chat/completions", chat))[0] == 200
    # And back: the limit applies again. Its count lives in etcd (shared by every balancer), not in the stage,
    # so the minute that began under the first configuration still counts.
    await put_image(state, "d", limited)
    await wait_for(lambda: app.discovery.image_configuration("d") == limited, what="image again")
    assert (await post(http, app, "/v1/chat/completions", chat))[0] == 429


async def test_n_choices_all_end_when_the_client_leaves_or_one_choice_breaks(state, make_balancer, runtimes, http):
    async def slow(request, context):
        for i in range(200):
            yield runtime_pb2.GenerateResponse(text=f"{i} ")
            await asyncio.sleep(0.02)
            if request.request_id.endswith("-2") and i == 3:
                raise Unavailable("replica lost its slot")
        yield final()

    app, runtime = await setup(state, make_balancer, runtimes, behaviour=slow)
    body = {"model": "d", "messages": [{"role": "user", "content": "hi"}], "n": 2, "stream": True}
    async with http.post(f"http://127.0.0.1:{app.http_port}/v1/chat/completions", json=body) as resp:
        await resp.content.readline()
        await wait_for(lambda: runtime.running == 2, what="both choices running")
    # The client hung up: every choice's runtime call is cancelled, not left generating.
    await wait_for(lambda: runtime.running == 0, what="both choices cancelled")
    assert runtime.cancelled == 2

    body["n"] = 3
    resp = await http.post(f"http://127.0.0.1:{app.http_port}/v1/chat/completions", json=body)
    events = [line[6:] for line in (await resp.text()).splitlines() if line.startswith("data: ")]
    # Choice 2 broke after its tokens were out: the stream ends with the error event, the others are stopped.
    assert events[-1] == "[DONE]" and "error" in json.loads(events[-2])
    await wait_for(lambda: runtime.running == 0, what="the other choices cancelled")
