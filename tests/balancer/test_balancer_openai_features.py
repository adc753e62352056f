"""n, logprobs, tools and embeddings on the wire: parsing onto the runtime's messages and OpenAI's response shapes."""

from __future__ import annotations

import base64
import json
import struct

import pytest
from google.protobuf import json_format

from clowder.runtime.v1 import runtime_pb2
from clowder_common.errors import InvalidArgument

from clowder_balancer import openai_api
from clowder_balancer.choices import choice_requests
from clowder_balancer.http_api import _ChunkWriter
from clowder_balancer.openai_embeddings import embedding_response, parse_embedding_request
from clowder_balancer.openai_logprobs import LegacyLogprobs, chat_logprobs

pytestmark = pytest.mark.unit

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                            "parameters": {"type": "object",
                                                           "properties": {"city": {"type": "string"}},
                                                           "required": ["city"]}}}


def _entry(token: str, logprob: float, *tops: tuple[str, float]) -> runtime_pb2.TokenLogprob:
    return runtime_pb2.TokenLogprob(
        token=token, logprob=logprob, bytes=token.encode(),
        top_logprobs=[runtime_pb2.TopLogprob(token=t, logprob=lp, bytes=t.encode()) for t, lp in tops],
    )


def _events(chunks: list[bytes]) -> list[dict]:
    return [json.loads(c[len(b"data: "):-2]) for c in chunks]


# -- n ---------------------------------------------------------------------------------------------


def test_n_is_parsed_and_each_choice_gets_seed_plus_i() -> None:
    parsed = openai_api.parse_request({**CHAT, "n": 3, "seed": 2**63 - 2}, "chat")
    assert parsed.n == 3
    requests = choice_requests(parsed.generate_request("rid"), parsed.n)
    assert [r.request_id for r in requests] == ["rid", "rid-1", "rid-2"]
    # The last seed wraps around within int64 instead of overflowing the field.
    assert [r.sampling.seed for r in requests] == [2**63 - 2, 2**63 - 1, -(2**63)]
    unseeded = choice_requests(openai_api.parse_request({**CHAT, "n": 2}, "chat").generate_request("r"), 2)
    assert not any(r.sampling.HasField("seed") for r in unseeded)


def test_n_choices_and_their_usage_in_one_response() -> None:
    usage = openai_api.total_usage([runtime_pb2.Usage(prompt_tokens=7, completion_tokens=2, cached_prompt_tokens=0),
                                    runtime_pb2.Usage(prompt_tokens=7, completion_tokens=3, cached_prompt_tokens=7)])
    body = openai_api.chat_completion("c", "m", 1, [openai_api.Choice(["a"], "stop"),
                                                    openai_api.Choice(["b"], "length")], usage)
    assert [(c["index"], c["message"]["content"], c["finish_reason"]) for c in body["choices"]] == [
        (0, "a", "stop"), (1, "b", "length")]
    assert body["usage"]["prompt_tokens"] == 7 and body["usage"]["completion_tokens"] == 5
    assert body["usage"]["total_tokens"] == 12


def test_streamed_chunks_of_n_choices_carry_their_index() -> None:
    parsed = openai_api.parse_request({**CHAT, "n": 2, "stream": True}, "chat")
    writer = _ChunkWriter(parsed, "c", 1)
    out = writer.opening()
    writer.message(out, 1, runtime_pb2.GenerateResponse(text="x"))
    writer.message(out, 0, runtime_pb2.GenerateResponse(text="y", finish_reason=runtime_pb2.FINISH_REASON_STOP))
    events = _events(out)
    assert [(e["choices"][0]["index"], e["choices"][0]["delta"]) for e in events[:2]] == [
        (0, {"role": "assistant", "content": ""}), (1, {"role": "assistant", "content": ""})]
    assert [(e["choices"][0]["index"], e["choices"][0]["delta"], e["choices"][0]["finish_reason"])
            for e in events[2:]] == [(1, {"content": "x"}, None), (0, {"content": "y"}, None), (0, {}, "stop")]


# -- logprobs --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "extra", "top"),
    [("chat", {"logprobs": True}, 0), ("chat", {"logprobs": True, "top_logprobs": 20}, 20),
     ("completion", {"logprobs": 0}, 0), ("completion", {"logprobs": 5}, 5)],
)
def test_logprobs_map_onto_sampling(kind, extra, top) -> None:
    body = {**(CHAT if kind == "chat" else {"model": "m", "prompt": "p"}), **extra}
    sampling = openai_api.parse_request(body, kind).sampling
    assert sampling.logprobs and sampling.top_logprobs == top


def test_logprobs_off_by_default_and_with_false() -> None:
    assert not openai_api.parse_request({**CHAT, "logprobs": False}, "chat").sampling.logprobs
    assert not openai_api.parse_request({"model": "m", "prompt": "p"}, "completion").sampling.logprobs


def test_chat_logprobs_shape() -> None:
    shaped = chat_logprobs([_entry("Hi", -0.25, ("Hi", -0.25), ("Hey", -1.5))])
    assert shaped == {"content": [{"token": "Hi", "logprob": -0.25, "bytes": [72, 105], "top_logprobs": [
        {"token": "Hi", "logprob": -0.25, "bytes": [72, 105]}, {"token": "Hey", "logprob": -1.5,
                                                                 "bytes": [72, 101, 121]}]}], "refusal": None}


def test_legacy_logprobs_shape_runs_text_offset_across_chunks() -> None:
    legacy = LegacyLogprobs()
    first = legacy.shape([_entry("The", -0.5, ("A", -0.25)), _entry(" sky", -1.0, (" sky", -1.0))])
    second = legacy.shape([_entry(" is", -0.75)])
    assert first == {"tokens": ["The", " sky"], "token_logprobs": [-0.5, -1.0],
                     "top_logprobs": [{"A": -0.25, "The": -0.5}, {" sky": -1.0}], "text_offset": [0, 3]}
    assert second["text_offset"] == [7] and second["top_logprobs"] == [{" is": -0.75}]


# -- tools -----------------------------------------------------------------------------------------


def test_tools_and_tool_choice_reach_the_runtime_request() -> None:
    parsed = openai_api.parse_request({**CHAT, "tools": [WEATHER], "parallel_tool_calls": True,
                                       "tool_choice": {"type": "function", "function": {"name": "get_weather"}}},
                                      "chat")
    request = parsed.generate_request("r")
    assert [json_format.MessageToDict(t) for t in request.chat.tools] == [WEATHER]
    assert request.chat.tool_choice == runtime_pb2.ToolChoice(mode=runtime_pb2.ToolChoice.MODE_FUNCTION,
                                                              function_name="get_weather")
    for name, mode in (("none", "MODE_NONE"), ("auto", "MODE_AUTO"), ("required", "MODE_REQUIRED")):
        request = openai_api.parse_request({**CHAT, "tools": [WEATHER], "tool_choice": name}, "chat") \
            .generate_request("r")
        assert request.chat.tool_choice.mode == runtime_pb2.ToolChoice.Mode.Value(mode)
    assert not openai_api.parse_request(CHAT, "chat").generate_request("r").chat.HasField("tool_choice")


def test_tool_call_history_is_accepted_and_tool_messages_get_the_function_name() -> None:
    messages = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18C, sunny"},
    ]
    parsed = openai_api.parse_request({"model": "m", "messages": messages, "tools": [WEATHER]}, "chat")
    assistant, tool = parsed.messages[1], parsed.messages[2]
    assert assistant.role == "assistant" and assistant.content == ""
    assert list(assistant.tool_calls) == [runtime_pb2.ToolCall(id="call_1", name="get_weather",
                                                               arguments='{"city":"Paris"}')]
    assert (tool.role, tool.tool_call_id, tool.name, tool.content) == ("tool", "call_1", "get_weather", "18C, sunny")


def test_tool_calls_out_non_streamed_and_streamed() -> None:
    call = runtime_pb2.ToolCall(id="call_x", name="get_weather", arguments='{"city": "Oslo"}')
    body = openai_api.chat_completion("c", "m", 1, [openai_api.Choice([], "tool_calls", tool_calls=[call])],
                                      runtime_pb2.Usage())
    assert body["choices"][0]["finish_reason"] == "tool_calls"
    assert body["choices"][0]["message"] == {
        "role": "assistant", "content": None, "refusal": None,
        "tool_calls": [{"id": "call_x", "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]}
    parsed = openai_api.parse_request({**CHAT, "stream": True, "tools": [WEATHER]}, "chat")
    out: list[bytes] = []
    _ChunkWriter(parsed, "c", 1).message(out, 0, runtime_pb2.GenerateResponse(
        finish_reason=runtime_pb2.FINISH_REASON_TOOL_CALLS, tool_calls=[call]))
    delta, finish = _events(out)
    assert delta["choices"][0]["delta"] == {"tool_calls": [
        {"index": 0, "id": "call_x", "type": "function",
         "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]}
    assert finish["choices"][0]["finish_reason"] == "tool_calls"


def test_runtime_tool_errors_name_the_openai_param() -> None:
    err = InvalidArgument("this model's chat template does not use tools", field="chat.tools",
                          reason="TOOLS_UNSUPPORTED")
    status, body = openai_api.error_from(err)
    assert status == 400
    assert body["error"]["param"] == "tools" and body["error"]["code"] == "tools_unsupported"


# -- embeddings ------------------------------------------------------------------------------------


def test_embedding_request_forms() -> None:
    assert parse_embedding_request({"model": "m", "input": "a"}).inputs == ("a",)
    parsed = parse_embedding_request({"model": "m", "input": ["a", "b"], "encoding_format": "base64"})
    assert parsed.inputs == ("a", "b") and parsed.encoding_format == "base64"


@pytest.mark.parametrize(
    ("body", "param"),
    [({"input": "a"}, "model"), ({"model": "m"}, "input"), ({"model": "m", "input": 5}, "input"),
     ({"model": "m", "input": [1, 2]}, "input[0]"), ({"model": "m", "input": ["a", ""]}, "input[1]"),
     ({"model": "m", "input": ["a"] * 2049}, "input"), ({"model": "m", "input": "a", "dimensions": 4}, "dimensions"),
     ({"model": "m", "input": "a", "encoding_format": "hex"}, "encoding_format")],
)
def test_bad_embedding_requests_name_their_param(body, param) -> None:
    with pytest.raises(InvalidArgument) as info:
        parse_embedding_request(body)
    assert openai_api.error_from(info.value, embeddings=True)[1]["error"]["param"] == param


def test_embedding_response_as_floats_and_as_base64_float32() -> None:
    embeddings = [runtime_pb2.Embedding(values=[0.5, -0.25]), runtime_pb2.Embedding(values=[1.0, 0.0])]
    floats = embedding_response("m", embeddings, 6, "float")
    assert floats == {"object": "list", "model": "m", "usage": {"prompt_tokens": 6, "total_tokens": 6}, "data": [
        {"object": "embedding", "index": 0, "embedding": [0.5, -0.25]},
        {"object": "embedding", "index": 1, "embedding": [1.0, 0.0]}]}
    packed = embedding_response("m", embeddings, 6, "base64")["data"][1]["embedding"]
    assert struct.unpack("<2f", base64.b64decode(packed)) == (1.0, 0.0)
    # The runtime's error about its own field names the client's.
    err = InvalidArgument("too long", field="inputs[3]")
    assert openai_api.error_from(err, embeddings=True)[1]["error"]["param"] == "input[3]"
