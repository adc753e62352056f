"""n choices, logprobs, tools and embeddings through the balancer to two real runtime processes, driven by the
official openai client (and the gRPC InferenceService)."""

from __future__ import annotations

import json
import math
import pathlib

import grpc
import openai
import pytest
from google.protobuf import struct_pb2

from clowder.balancer.v1 import inference_pb2, inference_pb2_grpc
from clowder.runtime.v1 import runtime_pb2

from clowder_balancer.router import EMBED_BATCH

from helpers.records import put_deployment
from helpers.runtimes import balancer_over, openai_client, runtime_processes
from helpers.state import fresh_prefix, prefixed_state
from helpers.wait import wait_for

pytestmark = pytest.mark.processes

DEPLOYMENT = "d"
REPLICAS = ("r1", "r2")
# A replica whose chat template teaches tool calls (the bundled model's own does not use `tools`).
TOOLS_DEPLOYMENT = "tools"
HERMES_TEMPLATE = pathlib.Path(__file__).parents[1] / "runtime" / "hermes_tools.jinja"
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
QUESTION = [{"role": "user", "content": "What is the weather in Paris?"}]
# Long enough (well over the runtime's minimum shared prefix) that reusing it shows in cached tokens.
SYSTEM = "You are a terse assistant. Answer in one short sentence, in plain English, no lists. " * 4
CHAT = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Name a color."}]


@pytest.fixture(scope="module")
async def cluster_state(etcd):
    async with prefixed_state(etcd.endpoint, fresh_prefix("test-balancer-openai")) as state:
        await put_deployment(state, DEPLOYMENT, replicas=len(REPLICAS))
        await put_deployment(state, TOOLS_DEPLOYMENT, replicas=1)
        yield state


@pytest.fixture(scope="module")
async def replicas(etcd, cluster_state, model_path, tmp_path_factory):
    work = tmp_path_factory.mktemp("runtimes")
    async with runtime_processes(cluster_state, etcd.endpoint, DEPLOYMENT, REPLICAS, model_path, work) as started:
        yield started


@pytest.fixture(scope="module")
async def tools_replica(etcd, cluster_state, model_path, tmp_path_factory, balancer):
    work = tmp_path_factory.mktemp("tools-runtime")
    async with runtime_processes(cluster_state, etcd.endpoint, TOOLS_DEPLOYMENT, ["t1"], model_path, work,
                                 extra_args=["--chat-template-file", str(HERMES_TEMPLATE)]) as started:
        await wait_for(lambda: len(balancer.discovery.endpoints(TOOLS_DEPLOYMENT)) == 1, what="tools endpoint")
        yield started[0]


@pytest.fixture(scope="module")
async def balancer(etcd, cluster_state, replicas):
    async with balancer_over(etcd.endpoint, cluster_state.prefix, {DEPLOYMENT: len(REPLICAS)}, ready_timeout_s=5) as app:
        yield app


@pytest.fixture(scope="module")
async def client(balancer):
    async with openai_client(balancer) as client:
        yield client


@pytest.fixture(scope="module")
async def inference(balancer):
    async with grpc.aio.insecure_channel(f"127.0.0.1:{balancer.grpc_port}") as channel:
        yield inference_pb2_grpc.InferenceServiceStub(channel)


async def _totals(replicas) -> list[int]:
    return [(await r.stats()).requests_total for r in replicas]


# -- n ---------------------------------------------------------------------------------------------


async def test_n_choices_run_on_one_replica_with_seeds_seed_plus_i(client, replicas):
    params = dict(model=DEPLOYMENT, messages=CHAT, max_tokens=10, temperature=1.0)
    # A prompt evaluated cold and one found in the KV cache give slightly different logits: compare warm
    # with warm (prefix affinity keeps the conversation on the replica that has it).
    await client.chat.completions.create(**{**params, "max_tokens": 1})
    before = await _totals(replicas)
    many = await client.chat.completions.create(**params, n=3, seed=100)
    after = await _totals(replicas)
    assert sorted(a - b for a, b in zip(after, before)) == [0, 3], "the three choices split over replicas"
    assert [c.index for c in many.choices] == [0, 1, 2]
    assert all(c.message.content and c.finish_reason in ("stop", "length") for c in many.choices)
    # Choice i is what a single request with seed 100+i gives.
    for i in (0, 2):
        single = await client.chat.completions.create(**params, seed=100 + i)
        assert many.choices[i].message.content == single.choices[0].message.content
        if i == 0:
            assert many.usage.prompt_tokens == single.usage.prompt_tokens, "the prompt counts once"
    assert many.usage.completion_tokens >= 3
    assert many.usage.total_tokens == many.usage.prompt_tokens + many.usage.completion_tokens


async def test_streamed_n_choices_carry_their_index(client):
    params = dict(model=DEPLOYMENT, messages=CHAT, max_tokens=8, temperature=1.0, seed=5, n=2)
    whole = await client.chat.completions.create(**params)
    stream = await client.chat.completions.create(**params, stream=True, stream_options={"include_usage": True})
    texts, finishes, roles = {0: "", 1: ""}, {}, set()
    usage = None
    async for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            if choice.delta.role:
                roles.add(choice.index)
            texts[choice.index] += choice.delta.content or ""
            if choice.finish_reason:
                assert choice.index not in finishes
                finishes[choice.index] = choice.finish_reason
    assert roles == {0, 1} and set(finishes) == {0, 1}
    assert [texts[0], texts[1]] == [c.message.content for c in whole.choices]
    assert usage is not None and usage.completion_tokens == whole.usage.completion_tokens


async def test_grpc_n_choices_each_report_usage_and_the_later_ones_reuse_the_prompt(inference):
    request = inference_pb2.CreateChatCompletionRequest(
        model=DEPLOYMENT, n=3, messages=[runtime_pb2.ChatMessage(role=m["role"], content=m["content"]) for m in CHAT],
        sampling=runtime_pb2.SamplingParams(max_tokens=6, temperature=1.0, seed=9),
    )
    chunks = [c async for c in inference.CreateChatCompletion(request, timeout=60)]
    last = {c.index: c for c in chunks if c.finish_reason}
    assert set(last) == {0, 1, 2}
    assert len({c.id for c in chunks}) == 1
    for index in (1, 2):
        # Started once the first choice had its prompt in the KV cache: it is not evaluated again.
        assert last[index].usage.cached_prompt_tokens >= last[index].usage.prompt_tokens // 2, last[index].usage


async def test_completions_n_choices(client):
    result = await client.completions.create(model=DEPLOYMENT, prompt="One, two,", max_tokens=4, n=2, seed=3,
                                             temperature=1.0)
    assert [c.index for c in result.choices] == [0, 1]
    assert all(c.text for c in result.choices)


# -- logprobs --------------------------------------------------------------------------------------


async def test_chat_logprobs_stream_and_not(client):
    params = dict(model=DEPLOYMENT, messages=CHAT, max_tokens=8, temperature=0, logprobs=True, top_logprobs=3)
    whole = await client.chat.completions.create(**params)
    content = whole.choices[0].logprobs.content
    assert len(content) == whole.usage.completion_tokens
    assert b"".join(bytes(t.bytes) for t in content).decode() == whole.choices[0].message.content
    for token in content:
        assert token.logprob <= 0 and len(token.top_logprobs) == 3
        # Greedy: the chosen token is the likeliest.
        assert token.top_logprobs[0].token == token.token
    stream = await client.chat.completions.create(**params, stream=True)
    streamed = [t async for chunk in stream for c in chunk.choices if c.logprobs for t in c.logprobs.content]
    assert [(t.token, round(t.logprob, 4)) for t in streamed] == [(t.token, round(t.logprob, 4)) for t in content]


async def test_chat_without_logprobs_has_none(client):
    result = await client.chat.completions.create(model=DEPLOYMENT, messages=CHAT, max_tokens=2)
    assert result.choices[0].logprobs is None


async def test_completion_logprobs_in_the_legacy_shape(client):
    params = dict(model=DEPLOYMENT, prompt="The capital of France is", max_tokens=6, temperature=0, logprobs=2)
    whole = await client.completions.create(**params)
    logprobs = whole.choices[0].logprobs
    assert "".join(logprobs.tokens) == whole.choices[0].text
    assert len(logprobs.token_logprobs) == len(logprobs.tokens) == whole.usage.completion_tokens
    assert logprobs.text_offset == [sum(len(t) for t in logprobs.tokens[:i]) for i in range(len(logprobs.tokens))]
    for token, top in zip(logprobs.tokens, logprobs.top_logprobs):
        assert token in top and 2 <= len(top) <= 3
    stream = await client.completions.create(**params, stream=True)
    tokens, offsets = [], []
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].logprobs:
            tokens += chunk.choices[0].logprobs.tokens
            offsets += chunk.choices[0].logprobs.text_offset
    assert tokens == logprobs.tokens and offsets == logprobs.text_offset


async def test_grpc_chunks_carry_logprobs(inference):
    request = inference_pb2.CreateCompletionRequest(
        model=DEPLOYMENT, prompt="The capital of France is",
        sampling=runtime_pb2.SamplingParams(max_tokens=4, temperature=0, logprobs=True, top_logprobs=2),
    )
    chunks = [c async for c in inference.CreateCompletion(request, timeout=60)]
    entries = [lp for c in chunks for lp in c.logprobs]
    assert len(entries) == chunks[-1].usage.completion_tokens
    assert all(len(lp.top_logprobs) == 2 for lp in entries)


# -- tools -----------------------------------------------------------------------------------------


async def test_tools_on_a_template_without_them_are_a_400(client):
    with pytest.raises(openai.BadRequestError) as info:
        await client.chat.completions.create(model=DEPLOYMENT, messages=QUESTION, tools=[WEATHER], max_tokens=8)
    assert info.value.code == "tools_unsupported" and info.value.param == "tools"


async def test_forced_tool_call_comes_back_as_tool_calls(client, tools_replica):
    params = dict(model=TOOLS_DEPLOYMENT, messages=QUESTION, tools=[WEATHER], temperature=0, max_tokens=120,
                  tool_choice={"type": "function", "function": {"name": "get_weather"}})
    result = await client.chat.completions.create(**params)
    choice = result.choices[0]
    assert choice.finish_reason == "tool_calls"
    [call] = choice.message.tool_calls
    assert call.type == "function" and call.id and call.function.name == "get_weather"
    assert isinstance(json.loads(call.function.arguments).get("city"), str)

    stream = await client.chat.completions.create(**params, stream=True)
    deltas, finishes = [], []
    async for chunk in stream:
        for c in chunk.choices:
            deltas += c.delta.tool_calls or []
            finishes += [c.finish_reason] if c.finish_reason else []
    assert finishes == ["tool_calls"]
    assert [(d.index, d.type, d.function.name) for d in deltas] == [(0, "function", "get_weather")]
    assert json.loads(deltas[0].function.arguments) == json.loads(call.function.arguments)

    # The conversation goes on with the call and its result in the history.
    follow = await client.chat.completions.create(
        model=TOOLS_DEPLOYMENT, tools=[WEATHER], tool_choice="none", temperature=0, max_tokens=24,
        messages=[*QUESTION, {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                  {"role": "tool", "tool_call_id": call.id, "content": "18 degrees and sunny"}],
    )
    assert follow.choices[0].finish_reason in ("stop", "length")
    assert follow.choices[0].message.content and not follow.choices[0].message.tool_calls


async def test_grpc_tool_calls(inference, tools_replica):
    tool = struct_pb2.Struct()
    tool.update(WEATHER)
    request = inference_pb2.CreateChatCompletionRequest(
        model=TOOLS_DEPLOYMENT, messages=[runtime_pb2.ChatMessage(role="user", content=QUESTION[0]["content"])],
        tools=[tool], tool_choice=runtime_pb2.ToolChoice(mode=runtime_pb2.ToolChoice.MODE_REQUIRED),
        sampling=runtime_pb2.SamplingParams(temperature=0, max_tokens=120),
    )
    chunks = [c async for c in inference.CreateChatCompletion(request, timeout=60)]
    assert chunks[-1].finish_reason == runtime_pb2.FINISH_REASON_TOOL_CALLS
    assert chunks[-1].tool_calls and {c.name for c in chunks[-1].tool_calls} == {"get_weather"}
    with pytest.raises(grpc.aio.AioRpcError) as info:
        bad = inference_pb2.CreateChatCompletionRequest()
        bad.CopyFrom(request)
        bad.tool_choice.CopyFrom(runtime_pb2.ToolChoice(mode=runtime_pb2.ToolChoice.MODE_FUNCTION,
                                                        function_name="nope"))
        async for _ in inference.CreateChatCompletion(bad, timeout=60):
            pass
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


# -- embeddings ------------------------------------------------------------------------------------


async def test_embeddings_through_the_openai_client(client):
    # The client asks for base64 by default and decodes it; ask for floats too and compare.
    packed = await client.embeddings.create(model=DEPLOYMENT, input=["The cat sat.", "Stock prices fell."])
    floats = await client.embeddings.create(model=DEPLOYMENT, input=["The cat sat.", "Stock prices fell."],
                                            encoding_format="float")
    assert packed.object == "list" and packed.model == DEPLOYMENT
    assert [d.index for d in packed.data] == [0, 1] and all(d.object == "embedding" for d in packed.data)
    for a, b in zip(packed.data, floats.data):
        assert len(a.embedding) == len(b.embedding) > 16
        assert a.embedding == pytest.approx(b.embedding, abs=1e-6)
        assert math.fsum(x * x for x in b.embedding) == pytest.approx(1.0, abs=1e-3)
    assert packed.usage.prompt_tokens == packed.usage.total_tokens > 4
    single = await client.embeddings.create(model=DEPLOYMENT, input="The cat sat.", encoding_format="float")
    assert single.data[0].embedding == pytest.approx(floats.data[0].embedding, abs=1e-5)
    assert floats.data[0].embedding != pytest.approx(floats.data[1].embedding, abs=1e-3)


async def test_more_inputs_than_one_runtime_call_takes_come_back_in_order(client):
    texts = [f"item number {i}" for i in range(EMBED_BATCH + 3)]
    result = await client.embeddings.create(model=DEPLOYMENT, input=texts, encoding_format="float")
    assert [d.index for d in result.data] == list(range(len(texts)))
    last = await client.embeddings.create(model=DEPLOYMENT, input=texts[-1], encoding_format="float")
    assert result.data[-1].embedding == pytest.approx(last.data[0].embedding, abs=1e-5)


async def test_a_text_too_long_for_the_model_is_a_400_naming_it(client):
    texts = ["short"] * (EMBED_BATCH + 2)
    texts[EMBED_BATCH + 1] = "word " * 20000
    with pytest.raises(openai.BadRequestError) as info:
        await client.embeddings.create(model=DEPLOYMENT, input=texts)
    assert info.value.param == f"input[{EMBED_BATCH + 1}]"


async def test_grpc_create_embedding(inference, client):
    reply = await inference.CreateEmbedding(
        inference_pb2.CreateEmbeddingRequest(model=DEPLOYMENT, inputs=["The cat sat."]), timeout=60)
    assert reply.model == DEPLOYMENT and len(reply.embeddings) == 1 and reply.prompt_tokens > 0
    via_http = await client.embeddings.create(model=DEPLOYMENT, input="The cat sat.", encoding_format="float")
    assert list(reply.embeddings[0].values) == pytest.approx(via_http.data[0].embedding, abs=1e-5)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await inference.CreateEmbedding(inference_pb2.CreateEmbeddingRequest(model=DEPLOYMENT, inputs=[""]))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


# -- embeddings refused before any runtime is asked ----------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        (dict(input="hi", dimensions=8), "dimensions"),
        (dict(input=[[1, 2, 3]]), "input[0]"),
        (dict(input=""), "input"),
        (dict(input=[]), "input"),
        (dict(input="hi", encoding_format="int8"), "encoding_format"),
    ],
)
async def test_bad_embedding_requests_are_400(client, kwargs, param):
    with pytest.raises(openai.BadRequestError) as info:
        await client.embeddings.create(model=DEPLOYMENT, **kwargs)
    assert info.value.param == param


async def test_embeddings_of_an_unknown_model_are_not_found(client):
    with pytest.raises(openai.NotFoundError):
        await client.embeddings.create(model="no-such-model", input="hi")
