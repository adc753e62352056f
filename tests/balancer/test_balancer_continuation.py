"""Building the request that continues a broken stream, and the counts the client sees across replicas (pure)."""

from __future__ import annotations

import pytest

from clowder.runtime.v1 import runtime_pb2

from clowder_balancer.continuation import (
    RUNTIME_DEFAULT_MAX_TOKENS, Progress, continuation_request, derived_seed, resolved_max_tokens,
)

pytestmark = pytest.mark.unit

INT64 = (-(2**63), 2**63 - 1)


def chat_request(**sampling) -> runtime_pb2.GenerateRequest:
    return runtime_pb2.GenerateRequest(
        request_id="rid",
        chat=runtime_pb2.ChatInput(messages=[runtime_pb2.ChatMessage(role="user", content="Count to ten.")]),
        sampling=runtime_pb2.SamplingParams(**sampling),
    )


def piece(text: str, tokens: int, prompt_tokens: int = 11, logprobs: int = 0) -> runtime_pb2.GenerateResponse:
    return runtime_pb2.GenerateResponse(
        text=text, completion_tokens=tokens, prompt_tokens=prompt_tokens,
        logprobs=[runtime_pb2.TokenLogprob(token="x", logprob=-1.0) for _ in range(logprobs)],
    )


def last(text: str, tokens: int, prompt_tokens: int, cached: int = 0) -> runtime_pb2.GenerateResponse:
    message = piece(text, tokens, prompt_tokens)
    message.finish_reason = runtime_pb2.FINISH_REASON_STOP
    message.usage.CopyFrom(runtime_pb2.Usage(prompt_tokens=prompt_tokens, completion_tokens=tokens,
                                             cached_prompt_tokens=cached))
    return message


def test_chat_continues_the_partial_assistant_message_with_the_tokens_left_and_the_same_stops():
    request = chat_request(max_tokens=100, stop=["\n\n", "END"], temperature=0.7, top_p=0.9)
    out = continuation_request(request, "One, two,", 4, 96)
    assert out.chat.assistant_prefix == "One, two,"
    assert list(out.chat.messages) == list(request.chat.messages)
    assert out.sampling.max_tokens == 96
    assert list(out.sampling.stop) == ["\n\n", "END"]
    assert (out.sampling.temperature, out.sampling.top_p) == pytest.approx((0.7, 0.9))
    assert out.request_id == "rid"
    assert not out.sampling.HasField("seed"), "an unseeded request stays unseeded"
    assert request.chat.assistant_prefix == "" and request.sampling.max_tokens == 100, "the original is kept"


def test_a_completion_continues_from_its_prompt_plus_the_text_sent():
    request = runtime_pb2.GenerateRequest(request_id="c", prompt="Once upon a time",
                                          sampling=runtime_pb2.SamplingParams(max_tokens=50))
    out = continuation_request(request, " there was", 2, 48)
    assert out.prompt == "Once upon a time there was"
    assert out.sampling.max_tokens == 48
    assert not out.HasField("chat")


def test_seeds_derive_deterministically_from_the_seed_and_the_tokens_so_far():
    assert derived_seed(42, 0) == 42, "a restart from nothing is the same generation"
    assert derived_seed(42, 7) == derived_seed(42, 7)
    seeds = {derived_seed(42, n) for n in range(1, 200)} | {derived_seed(43, 7), derived_seed(-1, 7)}
    assert len(seeds) == 201
    assert all(INT64[0] <= s <= INT64[1] for s in seeds | {derived_seed(INT64[1], 3), derived_seed(INT64[0], 9)})
    out = continuation_request(chat_request(seed=42, max_tokens=10), "a", 3, 7)
    assert out.sampling.seed == derived_seed(42, 3) != 42


def test_max_tokens_resolves_from_the_request_then_the_aimage_then_the_runtime_default():
    assert resolved_max_tokens(chat_request(max_tokens=12), 300) == 12
    assert resolved_max_tokens(chat_request(), 300) == 300
    assert resolved_max_tokens(chat_request(), 0) == RUNTIME_DEFAULT_MAX_TOKENS
    # Unset max_tokens stays unset only when nothing was generated yet; after that the rest is explicit.
    progress = Progress(chat_request(), resolved_max_tokens(chat_request(), 0))
    progress.relay(piece("a b", 5))
    following = progress.begin_continuation()
    assert following is not None and following.sampling.max_tokens == RUNTIME_DEFAULT_MAX_TOKENS - 5


def test_counts_read_as_one_generation_across_replicas():
    progress = Progress(chat_request(max_tokens=30), 30)
    assert progress.relay(piece("One,", 2, prompt_tokens=11)).completion_tokens == 2
    progress.relay(piece(" two,", 4, prompt_tokens=11))
    following = progress.begin_continuation()
    assert following is not None
    assert following.chat.assistant_prefix == "One, two," and following.sampling.max_tokens == 26
    # The second replica counts its own prompt (with the prefix in it) and its own tokens.
    relayed = progress.relay(piece(" three,", 2, prompt_tokens=15))
    assert (relayed.completion_tokens, relayed.prompt_tokens) == (6, 11)
    end = progress.relay(last(" four.", 3, prompt_tokens=15, cached=14))
    assert (end.usage.prompt_tokens, end.usage.completion_tokens, end.usage.cached_prompt_tokens) == (11, 7, 11)
    assert end.completion_tokens == 7
    assert progress.text == "One, two, three, four."
    # A second break continues from everything sent, seeds and all.
    again = progress.begin_continuation()
    assert again is not None
    assert again.chat.assistant_prefix == "One, two, three, four." and again.sampling.max_tokens == 23
    assert progress.continuations == 2


def test_nothing_sent_means_starting_over_and_no_token_left_means_a_length_finish():
    progress = Progress(chat_request(max_tokens=10, seed=5), 10)
    # Tokens held back (a possible stop string) were counted but never shown: they do not count.
    progress.relay(piece("", 3))
    restart = progress.begin_continuation()
    assert restart is not None
    assert restart.chat.assistant_prefix == "" and restart.sampling.max_tokens == 10 and restart.sampling.seed == 5

    full = Progress(chat_request(max_tokens=4), 4)
    full.relay(piece("a b c d", 4, prompt_tokens=9))
    assert full.begin_continuation() is None
    finish = full.length_finish()
    assert finish.finish_reason == runtime_pb2.FINISH_REASON_LENGTH
    assert (finish.usage.prompt_tokens, finish.usage.completion_tokens) == (9, 4)


def test_json_output_and_forced_tool_calls_are_not_continued_once_text_was_sent():
    json_mode = Progress(chat_request(response_format=runtime_pb2.RESPONSE_FORMAT_JSON_OBJECT), 20)
    assert json_mode.refusal() == "", "before any text, starting over is fine"
    json_mode.relay(piece('{"a": ', 3))
    assert "json_object" in json_mode.refusal()

    forced = chat_request()
    forced.chat.tool_choice.mode = runtime_pb2.ToolChoice.MODE_REQUIRED
    progress = Progress(forced, 20)
    progress.relay(piece("text", 1))
    assert "tool call" in progress.refusal()

    plain = Progress(chat_request(logprobs=True), 20)
    plain.relay(piece("Hello", 1, logprobs=1))
    assert plain.refusal() == ""
