"""Request validation and defaults, without a model: what a GenerateRequest becomes, or which fields are wrong."""

from __future__ import annotations

import asyncio
import math

import pytest
from clowder.controller.v1 import resources_pb2
from clowder.runtime.v1 import runtime_pb2

from clowder_common.errors import InvalidArgument
from clowder_runtime.generation import ChatTurn, Finish, FinishReason, GenerationStream, Output, Piece
from clowder_runtime.validation import DEFAULT_MAX_TOKENS, DEFAULT_TEMPERATURE, build_job, validate_image_config

pytestmark = pytest.mark.unit


def chat(*turns: tuple[str, str], **sampling) -> runtime_pb2.GenerateRequest:
    return runtime_pb2.GenerateRequest(
        request_id="t",
        chat=runtime_pb2.ChatInput(messages=[runtime_pb2.ChatMessage(role=r, content=c) for r, c in turns]),
        sampling=runtime_pb2.SamplingParams(**sampling),
    )


def fields_of(error: InvalidArgument) -> list[str]:
    return [v.field for v in error.violations]


def test_unset_sampling_takes_image_defaults_then_llama_cpp_defaults():
    image = resources_pb2.ImageConfiguration(top_p=0.5, max_tokens=99)
    job = build_job(chat(("user", "hi")), image)
    assert job.sampling.top_p == 0.5
    assert job.sampling.max_tokens == 99
    assert job.sampling.temperature == pytest.approx(DEFAULT_TEMPERATURE)
    assert job.sampling.seed is None
    bare = build_job(chat(("user", "hi")), resources_pb2.ImageConfiguration())
    assert bare.sampling.max_tokens == DEFAULT_MAX_TOKENS


def test_request_values_override_image_defaults():
    image = resources_pb2.ImageConfiguration(temperature=1.5, max_tokens=99)
    job = build_job(chat(("user", "hi"), temperature=0.0, max_tokens=7, seed=-3, top_k=0, stop=["\n"]), image)
    assert job.sampling.temperature == 0.0
    assert job.sampling.max_tokens == 7
    assert job.sampling.seed == -3
    assert job.sampling.top_k == 0
    assert job.sampling.stop == ("\n",)


def test_new_sampling_fields_reach_the_job():
    job = build_job(
        chat(("user", "hi"), min_p=0.1, repetition_penalty=1.3, frequency_penalty=0.5, presence_penalty=-0.5,
             response_format=runtime_pb2.RESPONSE_FORMAT_JSON_OBJECT, adapter="pirate"),
        resources_pb2.ImageConfiguration(),
    )
    assert job.sampling.min_p == pytest.approx(0.1)
    assert job.sampling.repetition_penalty == pytest.approx(1.3)
    assert job.sampling.frequency_penalty == pytest.approx(0.5)
    assert job.sampling.presence_penalty == pytest.approx(-0.5)
    assert job.sampling.json is True
    assert job.adapter == "pirate"
    plain = build_job(chat(("user", "hi")), resources_pb2.ImageConfiguration())
    assert (plain.sampling.json, plain.adapter, plain.sampling.repetition_penalty) == (False, "", 1.0)


def test_image_system_prompt_is_prepended_only_when_the_chat_has_none():
    image = resources_pb2.ImageConfiguration(system_prompt="Be brief.")
    job = build_job(chat(("user", "hi")), image)
    assert job.messages == (ChatTurn("system", "Be brief."), ChatTurn("user", "hi"))
    own = build_job(chat(("system", "Be long."), ("user", "hi")), image)
    assert own.messages == (ChatTurn("system", "Be long."), ChatTurn("user", "hi"))


@pytest.mark.parametrize(
    ("request_", "fields"),
    [
        (chat(("user", "hi"), temperature=5), ["temperature"]),
        (chat(("user", "hi"), temperature=-0.1), ["temperature"]),
        (chat(("user", "hi"), temperature=math.nan), ["temperature"]),
        (chat(("user", "hi"), top_p=0), ["top_p"]),
        (chat(("user", "hi"), top_p=1.01), ["top_p"]),
        (chat(("user", "hi"), max_tokens=0), ["max_tokens"]),
        (chat(("user", "hi"), min_p=-0.1), ["min_p"]),
        (chat(("user", "hi"), repetition_penalty=0), ["repetition_penalty"]),
        (chat(("user", "hi"), frequency_penalty=2.5), ["frequency_penalty"]),
        (chat(("user", "hi"), presence_penalty=math.nan), ["presence_penalty"]),
        (chat(("user", "hi"), response_format=7), ["response_format"]),
        (chat(("user", "hi"), stop=["ok", ""]), ["stop[1]"]),
        (chat(("user", "hi"), stop=[str(i) for i in range(17)]), ["stop"]),
        (chat(), ["messages"]),
        (chat(("user", "hi"), ("robot", "beep")), ["messages[1].role"]),
        (runtime_pb2.GenerateRequest(prompt=""), ["prompt"]),
        (runtime_pb2.GenerateRequest(), ["input"]),
        # Every problem is reported at once, not only the first.
        (chat(("wizard", "x"), temperature=3, top_p=2), ["messages[0].role", "temperature", "top_p"]),
    ],
)
def test_bad_requests_name_each_bad_field(request_, fields):
    with pytest.raises(InvalidArgument) as caught:
        build_job(request_, resources_pb2.ImageConfiguration())
    assert sorted(fields_of(caught.value)) == sorted(fields)


def test_assistant_prefix_reaches_a_chat_job_and_refuses_a_grammar():
    request = chat(("user", "hi"))
    request.chat.assistant_prefix = "Hello, I"
    assert build_job(request, resources_pb2.ImageConfiguration()).assistant_prefix == "Hello, I"
    # The JSON grammar starts at the answer's first character: it cannot continue a partial one.
    request.sampling.response_format = runtime_pb2.RESPONSE_FORMAT_JSON_OBJECT
    with pytest.raises(InvalidArgument) as caught:
        build_job(request, resources_pb2.ImageConfiguration())
    assert fields_of(caught.value) == ["assistant_prefix"]


def test_invalid_image_defaults_are_refused_up_front():
    with pytest.raises(InvalidArgument) as caught:
        validate_image_config(resources_pb2.ImageConfiguration(temperature=9, max_tokens=0))
    assert sorted(fields_of(caught.value)) == ["image_config.max_tokens", "image_config.temperature"]


async def test_stream_merges_pieces_that_piled_up_and_ends_at_finish():
    loop = asyncio.get_running_loop()
    cancelled = []
    stream = GenerationStream(loop, on_cancel=lambda: cancelled.append(True))
    finish = Finish(FinishReason.LENGTH, 3, 2)
    stream.push_text("a")
    stream.push_text("b")
    stream.push_finish(finish)
    await asyncio.sleep(0)  # let call_soon_threadsafe deliver
    outputs = [output async for output in stream]
    # The last output's counts are the finish's (what the balancer continues a broken stream from).
    assert outputs == [Output("ab", finish, completion_tokens=2, prompt_tokens=3)]
    stream.cancel()
    assert cancelled == [], "a finished stream has nothing to cancel"


async def test_stream_outputs_carry_the_latest_token_counts_of_the_pieces_they_merge():
    stream = GenerationStream(asyncio.get_running_loop(), on_cancel=lambda: None)
    stream.push_piece(Piece("a", (), tokens=1, prompt_tokens=7))
    stream.push_piece(Piece("b", (), tokens=3, prompt_tokens=7))
    await asyncio.sleep(0)
    assert await stream.__anext__() == Output("ab", completion_tokens=3, prompt_tokens=7)
    # Text pushed without counts (the engine's last flush) keeps the counts known so far.
    stream.push_text("c")
    await asyncio.sleep(0)
    assert await stream.__anext__() == Output("c", completion_tokens=3, prompt_tokens=7)


async def test_stream_delivers_text_before_raising_a_later_error():
    stream = GenerationStream(asyncio.get_running_loop(), on_cancel=lambda: None)
    stream.push_text("partial")
    stream.push_error(RuntimeError("decode failed"))
    await asyncio.sleep(0)
    assert await stream.__anext__() == Output("partial")
    with pytest.raises(RuntimeError, match="decode failed"):
        await stream.__anext__()
