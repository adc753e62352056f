"""OpenAI request parsing: bad bodies name their param; good ones map onto the runtime's SamplingParams."""

from __future__ import annotations

import json

import pytest

from clowder_common.errors import InvalidArgument

from clowder_balancer import openai_api

pytestmark = pytest.mark.unit

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
COMPLETION = {"model": "m", "prompt": "Once"}


def _param(kind: str, body) -> str | None:
    with pytest.raises(InvalidArgument) as info:
        openai_api.parse_request(body, kind)
    err = info.value
    status, shaped = openai_api.error_from(err)
    assert status == 400
    assert shaped["error"]["type"] == "invalid_request_error"
    assert shaped["error"]["message"]
    return shaped["error"]["param"]


@pytest.mark.parametrize(
    ("kind", "body", "param"),
    [
        ("chat", {"messages": CHAT["messages"]}, "model"),
        ("chat", {**CHAT, "model": ""}, "model"),
        ("chat", {**CHAT, "model": 5}, "model"),
        ("chat", {"model": "m"}, "messages"),
        ("chat", {**CHAT, "messages": []}, "messages"),
        ("chat", {**CHAT, "messages": "hi"}, "messages"),
        ("chat", {**CHAT, "messages": ["hi"]}, "messages[0]"),
        ("chat", {**CHAT, "messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
        ("chat", {**CHAT, "messages": [{"role": "user"}]}, "messages[0].content"),
        ("chat", {**CHAT, "messages": [{"role": "user", "content": 3}]}, "messages[0].content"),
        ("chat", {**CHAT, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
         "messages[0].content[0]"),
        ("chat", {**CHAT, "n": 17}, "n"),
        ("chat", {**CHAT, "n": "1"}, "n"),
        ("chat", {**CHAT, "max_tokens": 0}, "max_tokens"),
        ("chat", {**CHAT, "max_tokens": "10"}, "max_tokens"),
        ("chat", {**CHAT, "max_tokens": True}, "max_tokens"),
        ("chat", {**CHAT, "max_tokens": 1.5}, "max_tokens"),
        ("chat", {**CHAT, "max_completion_tokens": -1}, "max_completion_tokens"),
        ("chat", {**CHAT, "temperature": "hot"}, "temperature"),
        ("chat", {**CHAT, "temperature": 2.5}, "temperature"),
        ("chat", {**CHAT, "temperature": -0.1}, "temperature"),
        ("chat", {**CHAT, "top_p": 1.5}, "top_p"),
        ("chat", {**CHAT, "top_p": 0}, "top_p"),
        ("chat", {**CHAT, "stop": 5}, "stop"),
        ("chat", {**CHAT, "stop": ["a", 1]}, "stop"),
        ("chat", {**CHAT, "stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ("chat", {**CHAT, "stop": [""]}, "stop"),
        ("chat", {**CHAT, "seed": "x"}, "seed"),
        ("chat", {**CHAT, "seed": 2**70}, "seed"),
        ("chat", {**CHAT, "stream": "yes"}, "stream"),
        ("chat", {**CHAT, "stream_options": {"include_usage": True}}, "stream_options"),
        ("chat", {**CHAT, "stream": True, "stream_options": {"include_usage": "y"}}, "stream_options.include_usage"),
        ("chat", {**CHAT, "tools": [{"type": "function"}]}, "tools[0].function"),
        ("chat", {**CHAT, "messages": [{"role": "tool", "content": "42"}]}, "messages[0].tool_call_id"),
        ("chat", {**CHAT, "messages": [{"role": "assistant", "content": None, "tool_calls": [{"type": "function"}]}]},
         "messages[0].tool_calls[0].id"),
        ("chat", {**CHAT, "messages": [{"role": "assistant", "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "f", "arguments": 3}}]}]},
         "messages[0].tool_calls[0].function.arguments"),
        ("completion", {**COMPLETION, "logprobs": 6}, "logprobs"),
        ("completion", {**COMPLETION, "logprobs": True}, "logprobs"),
        ("completion", {**COMPLETION, "n": 0}, "n"),
        ("completion", {"model": "m"}, "prompt"),
        ("completion", {**COMPLETION, "prompt": 7}, "prompt"),
        ("completion", {**COMPLETION, "prompt": ["a", "b"]}, "prompt"),
        ("completion", {**COMPLETION, "prompt": [1, 2, 3]}, "prompt"),
        ("completion", {**COMPLETION, "echo": True}, "echo"),
        ("completion", {**COMPLETION, "best_of": 3}, "best_of"),
        ("completion", {**COMPLETION, "max_tokens": 0}, "max_tokens"),
    ],
)
def test_bad_request_names_its_param(kind: str, body: dict, param: str) -> None:
    assert _param(kind, body) == param


@pytest.mark.parametrize(
    "raw",
    [b"", b"{", b"not json", b"[1, 2]", b'"text"', b'{"model": NaN}', b"\xff\xfe"],
)
def test_undecodable_body_is_invalid_request_without_param(raw: bytes) -> None:
    with pytest.raises(InvalidArgument) as info:
        openai_api.decode_body(raw)
    status, shaped = openai_api.error_from(info.value)
    assert status == 400 and shaped["error"]["param"] is None


def test_chat_request_maps_to_sampling_params() -> None:
    body = {
        "model": "smol",
        "messages": [
            {"role": "developer", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
            {"role": "assistant", "content": None},
        ],
        "max_tokens": 5,
        "max_completion_tokens": 7,
        "temperature": 0,
        "top_p": 0.5,
        "stop": "\n",
        "seed": 42,
        "n": 1,
        "stream": True,
        "stream_options": {"include_usage": True},
        "user": "ignored",
    }
    parsed = openai_api.parse_request(json.loads(json.dumps(body)), "chat")
    assert parsed.model == "smol" and parsed.stream and parsed.include_usage
    assert [(m.role, m.content) for m in parsed.messages] == [("system", "be brief"), ("user", "a\nb"),
                                                              ("assistant", "")]
    request = parsed.generate_request("rid-1")
    assert request.request_id == "rid-1"
    assert request.WhichOneof("input") == "chat"
    sampling = request.sampling
    # max_completion_tokens is the newer name and wins over max_tokens.
    assert sampling.max_tokens == 7
    assert sampling.HasField("temperature") and sampling.temperature == 0
    assert sampling.top_p == pytest.approx(0.5)
    assert list(sampling.stop) == ["\n"]
    assert sampling.seed == 42


def test_unset_sampling_fields_stay_unset() -> None:
    parsed = openai_api.parse_request({**COMPLETION, "prompt": ["Once"], "stop": None, "seed": None}, "completion")
    request = parsed.generate_request("r")
    assert request.prompt == "Once"
    assert not parsed.stream and not parsed.include_usage
    for field in ("temperature", "top_p", "max_tokens", "seed", "top_k"):
        assert not request.sampling.HasField(field), field
    assert list(request.sampling.stop) == []
