"""Continuous batching on the real model: same text as one at a time, prefix reuse, adapters, JSON, slots, metrics."""

from __future__ import annotations

import asyncio
import json
import time

import aiohttp
import llama_cpp
import pytest
from clowder.controller.v1 import resources_pb2
from clowder.runtime.v1 import runtime_pb2
from runtime_helpers import running_runtime, runtime_stub, wait_for_stats
from runtime_lora import write_lora_adapter

from clowder_runtime import engine
from clowder_runtime.config import RuntimeConfig
from clowder_runtime.prefix import block_hashes

pytestmark = pytest.mark.inprocess

SLOTS = 4
# Small chunks, so a long prompt is prefilled over several steps while other sequences decode.
PREFILL_CHUNK = 32
CONTEXT_SIZE = 512
THREADS = 1
ADAPTER = "pirate"
FRESH_SLOTS = 8
SHARED_SYSTEM = (
    "You are the archivist of the lighthouse of Brannoc. You answer questions about the lighthouse, its keepers,"
    " the storms of the northern coast, the ships that passed and the logbooks kept since the year 1790."
    " Be precise, cite the logbook year when you can, and never invent a keeper's name."
)


@pytest.fixture(scope="module")
async def runtime(model_path, tmp_path_factory):
    adapter = write_lora_adapter(tmp_path_factory.mktemp("lora") / "pirate.gguf")
    config = RuntimeConfig(
        model_path=str(model_path),
        deployment="smol-batch",
        context_size=CONTEXT_SIZE,
        threads=THREADS,
        slots=SLOTS,
        prefill_chunk=PREFILL_CHUNK,
        max_waiting=8,
        adapters=(f"{ADAPTER}={adapter}",),
        metrics_listen="127.0.0.1:0",
    )
    async with running_runtime(config, resources_pb2.ImageConfiguration()) as app:
        yield app


def completion(prompt: str, **sampling) -> runtime_pb2.GenerateRequest:
    return runtime_pb2.GenerateRequest(request_id="b", prompt=prompt, sampling=runtime_pb2.SamplingParams(**sampling))


def chat(messages: list[tuple[str, str]], **sampling) -> runtime_pb2.GenerateRequest:
    return runtime_pb2.GenerateRequest(
        request_id="b",
        chat=runtime_pb2.ChatInput(messages=[runtime_pb2.ChatMessage(role=r, content=c) for r, c in messages]),
        sampling=runtime_pb2.SamplingParams(**sampling),
    )


async def generate(stub, request, timeout: float = 60) -> tuple[str, runtime_pb2.GenerateResponse]:
    responses = [r async for r in stub.Generate(request, timeout=timeout)]
    return "".join(r.text for r in responses), responses[-1]


async def stats(stub) -> runtime_pb2.GetStatsResponse:
    return await stub.GetStats(runtime_pb2.GetStatsRequest(), timeout=5)


@pytest.fixture
async def fresh_stub(model_path):
    """A replica with nothing cached and a slot per prompt, so every prompt is evaluated whole."""
    config = RuntimeConfig(
        model_path=str(model_path), context_size=CONTEXT_SIZE, threads=THREADS, slots=FRESH_SLOTS,
        prefill_chunk=PREFILL_CHUNK, max_waiting=8,
    )
    async with running_runtime(config) as app, runtime_stub(app) as stub:
        yield stub


async def test_concurrent_requests_give_the_same_text_as_single_sequence_runs(fresh_stub, model_path):
    stub = fresh_stub
    prompts: list[str | list[tuple[str, str]]] = [
        "Once upon a time",
        "The capital of France is",
        "def fibonacci(n):",
        "In 1492, Columbus",
        [("user", "Name three colours.")],
        # Long enough to be prefilled in several chunks while the others decode.
        [("system", SHARED_SYSTEM), ("user", "Who kept the light in 1850?")],
        "A long time ago, " + SHARED_SYSTEM,
        "Hello, my name is",
    ]
    tokens = 24

    def request(prompt):
        if isinstance(prompt, str):
            return completion(prompt, temperature=0, max_tokens=tokens)
        return chat(prompt, temperature=0, max_tokens=tokens)

    peak = 0

    async def watch() -> None:
        nonlocal peak
        while True:
            peak = max(peak, (await stats(stub)).num_requests_running)
            await asyncio.sleep(0.01)

    watcher = asyncio.create_task(watch())
    try:
        together = await asyncio.wait_for(asyncio.gather(*(generate(stub, request(p)) for p in prompts)), 120)
    finally:
        watcher.cancel()
    assert peak > 1, "the requests should have shared the batch"
    assert all(last.usage.cached_prompt_tokens == 0 for _, last in together)

    # The single-sequence baseline: llama-cpp-python, one prompt at a time from an empty context,
    # evaluating prompts in chunks of the same size (the split of a prompt changes llama.cpp's rounding).
    llm = llama_cpp.Llama(
        model_path=str(model_path), n_ctx=CONTEXT_SIZE, n_batch=PREFILL_CHUNK, n_ubatch=PREFILL_CHUNK,
        n_threads=THREADS, n_threads_batch=THREADS, flash_attn=True, verbose=False,
    )

    def alone(prompt) -> tuple[str, int]:
        llm.reset()
        if isinstance(prompt, str):
            result = llm.create_completion(prompt, temperature=0, max_tokens=tokens)
            return result["choices"][0]["text"], result["usage"]["completion_tokens"]
        messages = [{"role": r, "content": c} for r, c in prompt]
        result = llm.create_chat_completion(messages, temperature=0, max_tokens=tokens)
        return result["choices"][0]["message"]["content"], result["usage"]["completion_tokens"]

    try:
        expected = [await asyncio.to_thread(alone, p) for p in prompts]
    finally:
        llm.close()
    for (text, last), (expected_text, expected_tokens) in zip(together, expected):
        assert text == expected_text
        assert last.usage.completion_tokens == expected_tokens


@pytest.mark.parametrize("burst_gap_ms, first_decode_holds", [(250, 4), (0, 1)])
async def test_a_burst_that_finds_the_replica_idle_starts_in_one_step(model_path, monkeypatch, burst_gap_ms,
                                                                      first_decode_holds):
    """Requests sent moments apart to an idle replica: the engine waits for the rest of the burst, and all their
    prompts go in the first decode (not the first alone and the others a step later); burst_gap_ms 0 turns
    the wait off."""
    decodes: list[tuple[bool, int]] = []
    original = engine.LlamaEngine._decode

    def recording(self, group, entries, prompts):
        decodes.append((prompts, len({id(slot) for slot, _, _ in entries})))
        return original(self, group, entries, prompts)

    monkeypatch.setattr(engine.LlamaEngine, "_decode", recording)
    # Generous windows: what is checked is the wait, not its tuning for a quiet machine.
    config = RuntimeConfig(model_path=str(model_path), context_size=CONTEXT_SIZE, threads=THREADS, slots=SLOTS,
                           prefill_chunk=64, max_waiting=8, burst_gap_ms=burst_gap_ms, burst_wait_max_ms=1000)
    prompts = ["Once upon a time", "The capital of France is", "def fibonacci(n):", "Hello, my name is"]

    async def sent_after(delay: float, prompt: str) -> tuple[str, runtime_pb2.GenerateResponse]:
        await asyncio.sleep(delay)
        return await generate(stub, completion(prompt, temperature=0, max_tokens=2))

    async with running_runtime(config) as app, runtime_stub(app) as stub:
        decodes.clear()
        results = await asyncio.wait_for(
            # 100 ms apart: well inside the widened gap, and long enough that with no wait the first request
            # is decoding before the second arrives, even on a loaded machine.
            asyncio.gather(*(sent_after(0.1 * i, p) for i, p in enumerate(prompts))), 60)
    assert all(last.usage.completion_tokens == 2 for _, last in results)
    assert decodes[0] == (True, first_decode_holds), decodes


async def test_seeded_sample_is_the_same_alone_and_in_a_batch(stub):
    request = completion("My favourite animal is", temperature=0.9, max_tokens=20, seed=4242)
    alone, _ = await generate(stub, request)
    others = [completion(p, temperature=0.8, max_tokens=20) for p in ("The sea", "A dog", "Rain")]
    results = await asyncio.wait_for(asyncio.gather(generate(stub, request), *(generate(stub, o) for o in others)), 60)
    assert results[0][0] == alone


async def test_prefix_reuse_cuts_the_prompt_tokens_evaluated_and_reports_block_hashes(stub, runtime):
    first = [("system", SHARED_SYSTEM), ("user", "Which storm was the worst?")]
    second = [("system", SHARED_SYSTEM), ("user", "When was the lamp replaced?")]
    prompt_tokens = runtime.engine.tokenize_chat([{"role": r, "content": c} for r, c in second])
    shared = runtime.engine.tokenize_chat([{"role": "system", "content": SHARED_SYSTEM}])
    common = next(i for i, (a, b) in enumerate(zip(prompt_tokens, shared)) if a != b)
    assert common > 60

    await generate(stub, chat(first, temperature=0, max_tokens=4))
    text, last = await generate(stub, chat(second, temperature=0, max_tokens=16))
    assert last.usage.prompt_tokens == len(prompt_tokens)
    assert last.usage.cached_prompt_tokens >= common, "the shared system prompt should come from the cache"
    assert last.usage.prompt_tokens - last.usage.cached_prompt_tokens < len(prompt_tokens) - 60

    # The text is not compared with a fresh run: reuse splits the prompt's evaluation at the cache
    # boundary and places the new KV cells wherever the shared pool has room, and llama.cpp's kernels
    # round differently for another split or cell order (a fresh run with another chunk size differs
    # the same way), so temperature-0 text may change after a few tokens. Batching alone changes
    # nothing (test_concurrent_requests_give_the_same_text_as_single_sequence_runs).
    assert text

    # The replica advertises the blocks it holds, by the scheme a router can recompute.
    held = set((await stats(stub)).prefix_block_hashes)
    assert (await stats(stub)).prefix_block_tokens > 0
    full_blocks = block_hashes(prompt_tokens[: len(prompt_tokens) - 1])
    assert full_blocks and set(full_blocks) <= held


async def test_an_adapter_changes_the_output_and_batches_apart_from_the_base_model(stub):
    base = completion("The sky is", temperature=0, max_tokens=20)
    tuned = completion("The sky is", temperature=0, max_tokens=20, adapter=ADAPTER)
    base_text, _ = await generate(stub, base)
    tuned_text, _ = await generate(stub, tuned)
    assert tuned_text != base_text
    mixed = await asyncio.wait_for(asyncio.gather(generate(stub, base), generate(stub, tuned)), 60)
    assert [text for text, _ in mixed] == [base_text, tuned_text]
    assert list((await stats(stub)).adapters) == [ADAPTER]


async def test_json_mode_output_parses(stub):
    request = chat(
        [("user", "Describe a cat as a JSON object with keys name and age.")],
        temperature=0,
        max_tokens=96,
        response_format=runtime_pb2.RESPONSE_FORMAT_JSON_OBJECT,
    )
    text, last = await generate(stub, request)
    assert last.finish_reason == runtime_pb2.FINISH_REASON_STOP
    assert isinstance(json.loads(text), dict)


async def test_repetition_penalty_changes_the_output(stub):
    prompt = "one two one two one two one two"
    plain, _ = await generate(stub, completion(prompt, temperature=0, max_tokens=12))
    penalised, _ = await generate(stub, completion(prompt, temperature=0, max_tokens=12, repetition_penalty=1.8))
    assert penalised != plain


async def test_a_cancelled_request_frees_its_slot_for_a_waiting_one(stub):
    await wait_for_stats(stub, lambda s: s.num_requests_running == 0)
    longs = []
    for index in range(SLOTS):
        call = stub.Generate(completion(f"Story {index}: once upon a time", temperature=0, max_tokens=2000), timeout=60)
        await call.read()
        longs.append(call)
    waiting = stub.Generate(completion("The sky is", temperature=0, max_tokens=4), timeout=60)
    await wait_for_stats(stub, lambda s: s.num_requests_waiting == 1 and s.num_requests_running == SLOTS)
    try:
        longs[0].cancel()
        cancelled_at = time.monotonic()
        first = await asyncio.wait_for(waiting.read(), 10)
        assert first.text or first.finish_reason
        assert time.monotonic() - cancelled_at < 3
        busy = await stats(stub)
        assert busy.num_requests_waiting == 0
    finally:
        for call in longs:
            call.cancel()
        waiting.cancel()
    await wait_for_stats(stub, lambda s: s.num_requests_running == 0 and s.kv_cache_usage_perc == 0)


async def test_prometheus_metrics_report_load_and_cache(stub, runtime):
    # Long enough to leave whole prefix blocks in the cache.
    await generate(stub, completion(SHARED_SYSTEM, temperature=0, max_tokens=4))
    current = await stats(stub)
    url = f"http://127.0.0.1:{runtime.metrics.port}/metrics"
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        async with session.get(url) as response:
            assert response.status == 200
            body = await response.text()
    samples = {}
    for line in body.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    assert samples['num_requests_running{model_name="smol-batch"}'] == 0
    assert samples['num_requests_waiting{model_name="smol-batch"}'] == 0
    assert samples['kv_cache_usage_perc{model_name="smol-batch"}'] == 0
    assert samples['clowder_runtime_slots{model_name="smol-batch"}'] == SLOTS
    assert samples['clowder_runtime_cached_prefix_blocks{model_name="smol-batch"}'] == len(
        current.prefix_block_hashes
    ) > 0
    assert samples['clowder_runtime_requests_total{model_name="smol-batch"}'] >= current.requests_total
    assert any(name.startswith("lora_requests_info{") and 'max_lora="1"' in name for name in samples)
    # Every decode step counted: at least the prompt tokens that were not cached went through one.
    steps = samples['clowder_runtime_step_tokens_count{model_name="smol-batch"}']
    assert steps > 0
    assert samples['clowder_runtime_step_seconds_count{model_name="smol-batch"}'] == steps
    assert samples['clowder_runtime_step_tokens_bucket{le="+Inf",model_name="smol-batch"}'] == steps
    assert samples['clowder_runtime_step_tokens_sum{model_name="smol-batch"}'] >= (
        current.prompt_tokens_total - current.cached_prompt_tokens_total)
    buckets = [samples[f'clowder_runtime_step_tokens_bucket{{le="{le}",model_name="smol-batch"}}']
               for le in ("1.0", "2.0", "4.0", "8.0", "16.0", "32.0", "64.0", "128.0", "256.0", "512.0")]
    assert buckets == sorted(buckets) and buckets[0] > 0  # one-token steps: a lone sequence decoding
