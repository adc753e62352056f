"""Generate and GetStats against the real bundled model, through a real gRPC client, on one in-process replica."""

from __future__ import annotations

import asyncio
import time

import grpc
import llama_cpp
import pytest
from clowder.controller.v1 import resources_pb2
from clowder.runtime.v1 import runtime_pb2

from clowder_common.errors import InvalidArgument, ResourceExhausted, from_rpc_error
from clowder_runtime.config import RuntimeConfig
from runtime_helpers import running_runtime, wait_for_stats

pytestmark = pytest.mark.inprocess

SYSTEM_PROMPT = "You are a concise assistant."
# A completion the model continues for well over 128 tokens at temperature 0.
STORY = "Once upon a time"
MAX_WAITING = 2
# Few slots, so filling them all stays cheap.
SLOTS = 2
# Smaller than the default 2048 so filling the context stays quick on two cores.
CONTEXT_SIZE = 512
# llama.cpp's threads spin at barriers: with more threads than free cores (other
# processes, the event loop) it slows down by whole seconds, so tests use one.
THREADS = 1


@pytest.fixture(scope="module")
async def runtime(model_path):
    config = RuntimeConfig(
        model_path=str(model_path),
        deployment="smol-test",
        replica_id="r0",
        max_waiting=MAX_WAITING,
        context_size=CONTEXT_SIZE,
        threads=THREADS,
        slots=SLOTS,
    )
    async with running_runtime(config, resources_pb2.ImageConfiguration(system_prompt=SYSTEM_PROMPT)) as app:
        yield app


@pytest.fixture(scope="module")
def direct(model_path, runtime):
    """llama-cpp-python used directly with the replica's settings: the correctness baseline."""
    llm = llama_cpp.Llama(
        model_path=str(model_path),
        n_ctx=runtime.context_size,
        n_threads=runtime.engine.threads,
        n_threads_batch=runtime.engine.threads,
        # The runtime decodes with flash attention (its numbers do not depend on the batch); so must the baseline.
        flash_attn=True,
        verbose=False,
    )
    yield llm
    llm.close()


def completion(prompt: str, **sampling) -> runtime_pb2.GenerateRequest:
    return runtime_pb2.GenerateRequest(request_id="test", prompt=prompt, sampling=runtime_pb2.SamplingParams(**sampling))


def chat(messages: list[tuple[str, str]], **sampling) -> runtime_pb2.GenerateRequest:
    return runtime_pb2.GenerateRequest(
        request_id="test",
        chat=runtime_pb2.ChatInput(messages=[runtime_pb2.ChatMessage(role=r, content=c) for r, c in messages]),
        sampling=runtime_pb2.SamplingParams(**sampling),
    )


async def collect(stub, request, timeout: float = 30) -> list[runtime_pb2.GenerateResponse]:
    return [response async for response in stub.Generate(request, timeout=timeout)]


def text_of(responses) -> str:
    return "".join(r.text for r in responses)


async def run_direct(llm: llama_cpp.Llama, call, *args, **kwargs):
    # From an empty context each time, as the replica does, so both sides evaluate identically.
    def work():
        llm.reset()
        return call(*args, **kwargs)

    return await asyncio.to_thread(work)


async def test_chat_streams_pieces_and_ends_with_finish_and_usage(stub):
    request = chat(
        [("user", "What is the capital of France?"), ("assistant", "Paris."), ("user", "Tell me its long history.")],
        temperature=0,
        # The concise answer is 7 tokens long; 6 ends it by length.
        max_tokens=6,
    )
    responses = await collect(stub, request)
    assert len(responses) > 2, "text should arrive as it is generated, not in one piece"
    *pieces, last = responses
    assert all(r.finish_reason == runtime_pb2.FINISH_REASON_UNSPECIFIED for r in pieces)
    assert all(not r.HasField("usage") for r in pieces)
    assert text_of(responses).strip()
    assert last.finish_reason == runtime_pb2.FINISH_REASON_LENGTH
    assert last.usage.prompt_tokens > 0
    assert last.usage.completion_tokens == 6


async def test_every_message_counts_the_tokens_generated_so_far_and_the_prompt(stub):
    responses = await collect(stub, completion(STORY, temperature=0, max_tokens=24))
    counts = [r.completion_tokens for r in responses]
    assert counts == sorted(counts) and counts[0] >= 1, counts
    assert counts[-1] == responses[-1].usage.completion_tokens == 24
    assert {r.prompt_tokens for r in responses} == {responses[-1].usage.prompt_tokens}


async def test_greedy_chat_continued_from_an_assistant_prefix_ends_as_the_single_run(stub):
    """What the balancer does when a replica dies mid-stream: the partial answer is continued, not answered."""
    question = [("user", "Name three colours and say why you like them.")]
    whole = await collect(stub, chat(question, temperature=0, max_tokens=24))
    # Cut after the message that brought the 8th token: the text a client had when its replica died.
    cut = next(i for i, r in enumerate(whole) if r.completion_tokens >= 8) + 1
    sent, tokens = text_of(whole[:cut]), whole[cut - 1].completion_tokens
    request = chat(question, temperature=0, max_tokens=24 - tokens)
    request.chat.assistant_prefix = sent
    rest = await collect(stub, request)
    assert rest[-1].usage.completion_tokens == 24 - tokens
    # The prefix went into the prompt after the generation prompt, as the tokens it was generated as.
    assert rest[-1].usage.prompt_tokens == whole[-1].usage.prompt_tokens + tokens
    # Greedy, same tokens in the context: the same answer (the single run's text is what a client would
    # have seen without the failure).
    assert sent + text_of(rest) == text_of(whole)


async def test_temperature_zero_completion_equals_llama_cpp_directly(stub, direct):
    responses = await collect(stub, completion(STORY, temperature=0, max_tokens=32))
    expected = await run_direct(direct, direct.create_completion, STORY, temperature=0, max_tokens=32)
    assert text_of(responses) == expected["choices"][0]["text"]
    assert responses[-1].usage.prompt_tokens == expected["usage"]["prompt_tokens"]
    assert responses[-1].usage.completion_tokens == expected["usage"]["completion_tokens"]


async def test_chat_uses_the_model_template_and_the_image_system_prompt(stub, direct):
    question = "Name three colours."
    responses = await collect(stub, chat([("user", question)], temperature=0, max_tokens=24))
    expected = await run_direct(
        direct,
        direct.create_chat_completion,
        [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": question}],
        temperature=0,
        max_tokens=24,
    )
    assert text_of(responses) == expected["choices"][0]["message"]["content"]
    assert responses[-1].usage.prompt_tokens == expected["usage"]["prompt_tokens"]

    # A chat that brings its own system message keeps it, and gets no second one.
    own = [("system", "You are a pirate."), ("user", question)]
    responses = await collect(stub, chat(own, temperature=0, max_tokens=24))
    expected = await run_direct(
        direct,
        direct.create_chat_completion,
        [{"role": r, "content": c} for r, c in own],
        temperature=0,
        max_tokens=24,
    )
    assert text_of(responses) == expected["choices"][0]["message"]["content"]
    assert responses[-1].usage.prompt_tokens == expected["usage"]["prompt_tokens"]


async def test_same_seed_gives_same_text_and_other_seeds_differ(stub, direct):
    prompt = "My favourite animal is"

    async def sample(seed: int) -> str:
        return text_of(await collect(stub, completion(prompt, temperature=0.9, max_tokens=24, seed=seed)))

    first = await sample(1234)
    assert await sample(1234) == first
    expected = await run_direct(direct, direct.create_completion, prompt, temperature=0.9, max_tokens=24, seed=1234)
    assert first == expected["choices"][0]["text"], "a seeded sample should match llama-cpp-python's"
    others = [await sample(seed) for seed in (1, 2, 3)]
    assert any(text != first for text in others)


async def test_stop_string_ends_generation_and_is_never_returned(stub):
    base = text_of(await collect(stub, completion(STORY, temperature=0, max_tokens=32)))
    middle = len(base) // 2
    stop = base[middle : middle + 6]
    expected = base[: base.index(stop)]
    assert expected, "the chosen stop string should not open the text"
    # A decoy sharing the stop's first characters makes the runtime hold text back more often.
    decoy = stop[:2] + "\u2603never"
    responses = await collect(stub, completion(STORY, temperature=0, max_tokens=32, stop=[decoy, stop]))
    text = text_of(responses)
    assert text == expected
    assert stop not in text
    assert responses[-1].finish_reason == runtime_pb2.FINISH_REASON_STOP
    assert responses[-1].usage.completion_tokens < 32


async def test_text_held_back_for_a_stop_that_never_comes_is_returned_at_the_end(stub):
    base = text_of(await collect(stub, completion(STORY, temperature=0, max_tokens=32)))
    # The output ends with the beginning of this stop string, which never completes.
    stop = base[-4:] + "\u2603"
    responses = await collect(stub, completion(STORY, temperature=0, max_tokens=32, stop=[stop]))
    assert text_of(responses) == base
    assert responses[-1].finish_reason == runtime_pb2.FINISH_REASON_LENGTH


async def test_max_tokens_is_capped_to_the_room_left_in_the_context(stub, runtime):
    prompt = "word " * (CONTEXT_SIZE - 40)
    prompt_tokens = len(runtime.engine.tokenize_prompt(prompt))
    room = runtime.context_size - prompt_tokens
    assert 0 < room < 100, "the prompt should leave only a little room"
    responses = await collect(stub, completion(prompt, temperature=0, max_tokens=500))
    last = responses[-1]
    assert last.usage.prompt_tokens == prompt_tokens
    if last.finish_reason == runtime_pb2.FINISH_REASON_LENGTH:
        assert last.usage.completion_tokens == room
    else:
        assert last.usage.completion_tokens < room


async def test_cancelled_call_stops_generation_and_frees_the_model(stub):
    call = stub.Generate(completion(STORY, temperature=0, max_tokens=2000), timeout=60)
    first = await call.read()
    assert first.text
    busy = await stub.GetStats(runtime_pb2.GetStatsRequest(), timeout=5)
    assert busy.num_requests_running == 1
    assert busy.kv_cache_usage_perc > 0
    call.cancel()
    cancelled_at = time.monotonic()
    idle = await wait_for_stats(stub, lambda s: s.num_requests_running == 0, timeout=2)
    assert time.monotonic() - cancelled_at < 2
    assert idle.kv_cache_usage_perc == 0
    # The worker really stopped: no more tokens are being produced for nobody.
    await asyncio.sleep(0.3)
    later = await stub.GetStats(runtime_pb2.GetStatsRequest(), timeout=5)
    assert later.generation_tokens_total == idle.generation_tokens_total
    assert idle.generation_tokens_total - busy.generation_tokens_total < 200

    started = time.monotonic()
    responses = await collect(stub, completion("The sky is", temperature=0, max_tokens=8), timeout=10)
    assert responses[-1].finish_reason != runtime_pb2.FINISH_REASON_UNSPECIFIED
    assert time.monotonic() - started < 3


async def test_requests_beyond_the_slots_wait_in_order_and_a_full_queue_is_refused(stub):
    longs = []
    for _ in range(SLOTS):
        call = stub.Generate(completion(STORY, temperature=0, max_tokens=2000), timeout=60)
        await call.read()
        longs.append(call)
    arrivals: list[tuple[str, float, float]] = []

    async def short(name: str) -> None:
        first_at = None
        async for response in stub.Generate(completion("The sky is", temperature=0, max_tokens=4), timeout=60):
            first_at = first_at or time.monotonic()
            if response.finish_reason:
                arrivals.append((name, first_at, time.monotonic()))

    async def enqueue(name: str, waiting: int) -> asyncio.Task:
        task = asyncio.create_task(short(name))
        await wait_for_stats(stub, lambda s: s.num_requests_waiting == waiting)
        return task

    gives_up = await enqueue("gives-up", 1)
    first = await enqueue("first", 2)
    stats = await stub.GetStats(runtime_pb2.GetStatsRequest(), timeout=5)
    assert stats.num_requests_running == SLOTS
    assert stats.slots == SLOTS

    with pytest.raises(grpc.RpcError) as caught:
        await collect(stub, completion("The sky is", max_tokens=4))
    error = from_rpc_error(caught.value)
    assert isinstance(error, ResourceExhausted)
    assert error.retry_after is not None

    # A client that leaves while waiting frees its place in the queue.
    gives_up.cancel()
    await wait_for_stats(stub, lambda s: s.num_requests_waiting == 1)
    second = await enqueue("second", 2)

    # One slot frees up: the waiting requests take it in arrival order, the other long call goes on.
    longs[0].cancel()
    await asyncio.wait_for(asyncio.gather(first, second), 20)
    assert [name for name, _, _ in arrivals] == ["first", "second"]
    assert arrivals[1][1] >= arrivals[0][2], "with one free slot the second waits for the first"
    still = await stub.GetStats(runtime_pb2.GetStatsRequest(), timeout=5)
    assert still.num_requests_running == SLOTS - 1
    for call in longs[1:]:
        call.cancel()
    await wait_for_stats(stub, lambda s: s.num_requests_running == 0)


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        (chat([("user", "hi")], temperature=5), "temperature"),
        (chat([]), "messages"),
        (chat([("user", "hi")], top_p=0), "top_p"),
        (chat([("user", "hi")], max_tokens=0), "max_tokens"),
        (chat([("user", "hi"), ("narrator", "and then")]), "messages[1].role"),
        (completion(""), "prompt"),
        (completion("hello " * (CONTEXT_SIZE + 10), max_tokens=4), "prompt"),
        (chat([("user", "hello " * (CONTEXT_SIZE + 10))], max_tokens=4), "messages"),
        (chat([("user", "hi")], adapter="nope"), "adapter"),
        (chat([("user", "hi")], repetition_penalty=0), "repetition_penalty"),
        (chat([("user", "hi")], min_p=1.5), "min_p"),
    ],
)
async def test_bad_requests_get_invalid_argument_naming_the_field(stub, request_, field):
    with pytest.raises(grpc.RpcError) as caught:
        await collect(stub, request_)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    error = from_rpc_error(caught.value)
    assert isinstance(error, InvalidArgument)
    assert field in [v.field for v in error.violations]


async def test_stats_count_requests_and_tokens(stub):
    before = await stub.GetStats(runtime_pb2.GetStatsRequest(), timeout=5)
    responses = await collect(stub, completion("The sky is", temperature=0, max_tokens=6))
    after = await stub.GetStats(runtime_pb2.GetStatsRequest(), timeout=5)
    usage = responses[-1].usage
    assert after.model == "smol-test"
    assert after.requests_total == before.requests_total + 1
    assert after.prompt_tokens_total == before.prompt_tokens_total + usage.prompt_tokens
    assert after.cached_prompt_tokens_total == before.cached_prompt_tokens_total + usage.cached_prompt_tokens
    assert after.generation_tokens_total == before.generation_tokens_total + usage.completion_tokens
    assert after.num_requests_running == 0
    assert after.num_requests_waiting == 0
    assert after.kv_cache_usage_perc == 0
