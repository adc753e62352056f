"""Shapes of OpenAI responses, SSE chunks and errors."""

from __future__ import annotations

import json

import pytest

from clowder.runtime.v1 import runtime_pb2
from clowder_common.errors import FieldViolation, InvalidArgument, NotFound, ResourceExhausted, Unavailable

from clowder_balancer import openai_api

pytestmark = pytest.mark.unit


def _decode(event: bytes) -> dict:
    assert event.startswith(b"data: ") and event.endswith(b"\n\n")
    assert b"\n" not in event[:-2], "one event is one line"
    return json.loads(event[len(b"data: "):-2])


def test_chat_chunk_event() -> None:
    event = openai_api.sse_event(
        openai_api.chat_chunk("chatcmpl-1", "smol", 123, {"role": "assistant", "content": ""}, None, False)
    )
    chunk = _decode(event)
    assert chunk["object"] == "chat.completion.chunk"
    assert chunk["id"] == "chatcmpl-1" and chunk["model"] == "smol" and chunk["created"] == 123
    assert chunk["choices"] == [
        {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
    ]
    assert "usage" not in chunk


def test_chunks_carry_null_usage_when_usage_is_requested() -> None:
    chunk = openai_api.chat_chunk("c", "m", 1, {}, "length", True)
    assert chunk["usage"] is None and chunk["choices"][0]["finish_reason"] == "length"
    usage = openai_api.usage_chunk("chat", "c", "m", 1, runtime_pb2.Usage(prompt_tokens=3, completion_tokens=4))
    assert usage["choices"] == []
    assert usage["usage"] == {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7,
                              "prompt_tokens_details": {"cached_tokens": 0}}
    assert usage["object"] == "chat.completion.chunk"


def test_completion_chunk_and_unicode_survive_sse() -> None:
    text = "héllo\nwörld ✓"
    chunk = _decode(openai_api.sse_event(openai_api.completion_chunk("cmpl-1", "m", 5, text, None, False)))
    assert chunk["object"] == "text_completion"
    assert chunk["choices"][0]["text"] == text
    assert openai_api.SSE_DONE == b"data: [DONE]\n\n"


def test_non_streaming_shapes() -> None:
    usage = runtime_pb2.Usage(prompt_tokens=10, completion_tokens=2)
    chat = openai_api.chat_completion("chatcmpl-x", "m", 9, [openai_api.Choice(["H", "i"], "stop")], usage)
    assert chat["object"] == "chat.completion"
    assert chat["choices"][0]["message"] == {"role": "assistant", "content": "Hi", "refusal": None}
    assert chat["choices"][0]["logprobs"] is None
    assert chat["usage"]["total_tokens"] == 12
    text = openai_api.text_completion("cmpl-x", "m", 9, [openai_api.Choice(["Hi"], "length")], usage)
    assert text["object"] == "text_completion" and text["choices"][0]["text"] == "Hi"
    assert text["choices"][0]["finish_reason"] == "length"


def test_finish_reasons() -> None:
    assert openai_api.finish_reason_name(runtime_pb2.FINISH_REASON_STOP) == "stop"
    assert openai_api.finish_reason_name(runtime_pb2.FINISH_REASON_LENGTH) == "length"
    assert openai_api.finish_reason_name(runtime_pb2.FINISH_REASON_TOOL_CALLS) == "tool_calls"
    assert openai_api.finish_reason_name(runtime_pb2.FINISH_REASON_UNSPECIFIED) is None


def test_domain_errors_map_to_openai_errors() -> None:
    status, body = openai_api.error_from(NotFound("no such model", reason="MODEL_NOT_FOUND"))
    assert status == 404
    assert body == {"error": {"message": "no such model", "type": "invalid_request_error", "param": None,
                              "code": "model_not_found"}}
    # The runtime's field violations become the param the client sent.
    runtime_error = InvalidArgument("bad", violations=[FieldViolation("sampling.temperature", "too hot")])
    assert openai_api.error_from(runtime_error)[1]["error"]["param"] == "temperature"
    assert openai_api.error_from(InvalidArgument("long", field="chat.messages"))[1]["error"]["param"] == "messages"
    assert openai_api.error_from(Unavailable("none"))[0] == 503
    assert openai_api.error_from(Unavailable("none"))[1]["error"]["type"] == "server_error"
    assert openai_api.error_from(ResourceExhausted("full"))[0] == 429
