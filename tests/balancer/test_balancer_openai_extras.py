"""OpenAI parameters beyond the basics: response_format, penalties, min_p, top_k, adapter; cached-token usage."""

from __future__ import annotations

import pytest

from clowder.runtime.v1 import runtime_pb2
from clowder_common.errors import InvalidArgument

from clowder_balancer import openai_api
from clowder_balancer.grpc_api import _validate_common

pytestmark = pytest.mark.unit

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


@pytest.mark.parametrize(
    ("extra", "field", "value"),
    [
        ({"response_format": {"type": "json_object"}}, "response_format", runtime_pb2.RESPONSE_FORMAT_JSON_OBJECT),
        ({"response_format": {"type": "text"}}, "response_format", runtime_pb2.RESPONSE_FORMAT_TEXT),
        ({}, "response_format", runtime_pb2.RESPONSE_FORMAT_UNSPECIFIED),
        ({"frequency_penalty": 0.5}, "frequency_penalty", 0.5),
        ({"presence_penalty": -1}, "presence_penalty", -1.0),
        ({"min_p": 0.1}, "min_p", pytest.approx(0.1)),
        ({"repetition_penalty": 1.2}, "repetition_penalty", pytest.approx(1.2)),
        ({"top_k": 40}, "top_k", 40),
        ({"adapter": "pirate"}, "adapter", "pirate"),
    ],
)
def test_maps_onto_sampling(extra, field, value) -> None:
    parsed = openai_api.parse_request({**CHAT, **extra}, "chat")
    assert getattr(parsed.sampling, field) == value


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"response_format": {"type": "json_schema", "json_schema": {}}}, "response_format.type"),
        ({"response_format": {"type": "xml"}}, "response_format.type"),
        ({"response_format": "json"}, "response_format"),
        ({"frequency_penalty": 3}, "frequency_penalty"),
        ({"presence_penalty": "high"}, "presence_penalty"),
        ({"min_p": 1.5}, "min_p"),
        ({"repetition_penalty": 0}, "repetition_penalty"),
        ({"top_k": -1}, "top_k"),
        ({"adapter": 7}, "adapter"),
        ({"n": 17}, "n"),
        ({"n": 0}, "n"),
        ({"tools": [{"type": "function"}]}, "tools[0].function"),
        ({"tools": {"type": "function"}}, "tools"),
        ({"tools": [{"type": "retrieval", "function": {"name": "f"}}]}, "tools[0].type"),
        ({"tools": [{"type": "function", "function": {"name": "has space"}}]}, "tools[0].function.name"),
        ({"tool_choice": "auto"}, "tool_choice"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "always"}, "tool_choice"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}],
          "tool_choice": {"type": "function", "function": {"name": "g"}}}, "tool_choice"),
        ({"functions": [{"name": "f"}]}, "functions"),
        ({"logprobs": "yes"}, "logprobs"),
        ({"top_logprobs": 3}, "top_logprobs"),
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ],
)
def test_bad_values_name_their_param(extra, param) -> None:
    with pytest.raises(InvalidArgument) as info:
        openai_api.parse_request({**CHAT, **extra}, "chat")
    assert openai_api.error_from(info.value)[1]["error"]["param"] == param


@pytest.mark.parametrize(
    ("sampling", "field"),
    [
        (runtime_pb2.SamplingParams(min_p=2), "sampling.min_p"),
        (runtime_pb2.SamplingParams(frequency_penalty=-5), "sampling.frequency_penalty"),
        (runtime_pb2.SamplingParams(response_format=99), "sampling.response_format"),
    ],
)
def test_grpc_face_checks_the_same_limits(sampling, field) -> None:
    with pytest.raises(InvalidArgument) as info:
        _validate_common("m", sampling)
    assert info.value.violations[0].field == field


def test_usage_reports_cached_prompt_tokens() -> None:
    usage = openai_api.usage_dict(runtime_pb2.Usage(prompt_tokens=10, completion_tokens=2, cached_prompt_tokens=8))
    assert usage["prompt_tokens_details"] == {"cached_tokens": 8}
    assert usage["total_tokens"] == 12
