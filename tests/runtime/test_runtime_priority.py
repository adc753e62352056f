"""Request priority on the real model: interactive requests go first and preempt batch sequences, which resume by
recomputing (same text at temperature 0 and with a seed, no token repeated or lost); cancelling a preempted one;
and a batch job beside interactive requests on a real cluster."""

from __future__ import annotations

import asyncio
import contextlib
import pathlib
import sys
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import aiohttp
import grpc
import openai
import pytest
from clowder.runtime.v1 import runtime_pb2, runtime_pb2_grpc

from clowder.controller.v1 import resources_pb2
from clowder_common.errors import InvalidArgument
from clowder_runtime import engine
from clowder_runtime.app import RuntimeApp
from clowder_runtime.config import RuntimeConfig
from clowder_runtime.generation import GenerationJob, Priority, SamplingSettings
from clowder_runtime.scheduling import WaitQueue, preemption_victim
from clowder_runtime.validation import build_job
from helpers.wait import wait_for
from runtime_helpers import running_runtime, runtime_stub, wait_for_stats

# The batch tests' input-file helpers (tests/batch is not a package).
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "batch"))
from batch_helpers import chat_lines, custom_ids, ended, lines_of, poll, upload
from cluster_helpers import up_cluster

SLOTS = 3
CONTEXT_SIZE = 512
# Small chunks, as in test_runtime_batching: prompts and recomputed sequences take several steps.
PREFILL_CHUNK = 32
# One llama.cpp thread: more spin at barriers against the other processes on a two-core machine.
THREADS = 1
BATCH = runtime_pb2.PRIORITY_BATCH
# Continued at temperature 0 for 400 tokens without an end-of-sequence (checked on the bundled model).
STORIES = [f"Story {i}: Once upon a time" for i in range(SLOTS)]


@contextlib.asynccontextmanager
async def serving(model_path: pathlib.Path, context_size: int = CONTEXT_SIZE, prefill_chunk: int = PREFILL_CHUNK,
                  ) -> AsyncIterator[tuple[RuntimeApp, runtime_pb2_grpc.RuntimeServiceStub]]:
    """A fresh replica: nothing cached, so runs of the same prompts are evaluated the same way."""
    config = RuntimeConfig(
        model_path=str(model_path), deployment="smol-priority", context_size=context_size, threads=THREADS,
        slots=SLOTS, prefill_chunk=prefill_chunk, max_waiting=8, metrics_listen="127.0.0.1:0",
    )
    async with running_runtime(config) as app, runtime_stub(app) as stub:
        yield app, stub


def completion(prompt: str, priority: int = runtime_pb2.PRIORITY_UNSPECIFIED, **sampling) -> runtime_pb2.GenerateRequest:
    return runtime_pb2.GenerateRequest(request_id=f"{prompt[:20]}-{priority}", prompt=prompt, priority=priority,
                                       sampling=runtime_pb2.SamplingParams(**sampling))


def chat(content: str, priority: int = runtime_pb2.PRIORITY_UNSPECIFIED, **sampling) -> runtime_pb2.GenerateRequest:
    return runtime_pb2.GenerateRequest(
        request_id=f"chat-{priority}", priority=priority,
        chat=runtime_pb2.ChatInput(messages=[runtime_pb2.ChatMessage(role="user", content=content)]),
        sampling=runtime_pb2.SamplingParams(**sampling))


@dataclass
class Stream:
    """One Generate call read to its end in the background, with when its first text and its end came."""

    call: grpc.aio.UnaryStreamCall
    sent_at: float = field(default_factory=time.monotonic)
    messages: list[runtime_pb2.GenerateResponse] = field(default_factory=list)
    first_text_at: float | None = None
    done_at: float | None = None
    error: grpc.aio.AioRpcError | None = None
    task: asyncio.Task | None = None

    @classmethod
    def start(cls, stub: runtime_pb2_grpc.RuntimeServiceStub, request: runtime_pb2.GenerateRequest) -> Stream:
        stream = cls(stub.Generate(request, timeout=180))
        stream.task = asyncio.create_task(stream._read())
        return stream

    async def _read(self) -> None:
        try:
            async for message in self.call:
                if message.text and self.first_text_at is None:
                    self.first_text_at = time.monotonic()
                self.messages.append(message)
        except grpc.aio.AioRpcError as err:
            self.error = err
        self.done_at = time.monotonic()

    @property
    def text(self) -> str:
        return "".join(m.text for m in self.messages)

    @property
    def tokens(self) -> int:
        return self.messages[-1].completion_tokens if self.messages else 0

    @property
    def last(self) -> runtime_pb2.GenerateResponse:
        return self.messages[-1]

    async def finished(self, timeout: float = 180) -> Stream:
        assert self.task is not None
        await asyncio.wait_for(asyncio.shield(self.task), timeout)
        assert self.error is None, self.error
        return self


async def stats(stub: runtime_pb2_grpc.RuntimeServiceStub) -> runtime_pb2.GetStatsResponse:
    return await stub.GetStats(runtime_pb2.GetStatsRequest(), timeout=5)


async def counter(app: RuntimeApp, name: str) -> float:
    """One of the runtime's counters from /metrics."""
    assert app.metrics is not None
    url = f"http://127.0.0.1:{app.metrics.port}/metrics"
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        async with session.get(url) as response:
            body = await response.text()
    for line in body.splitlines():
        if line.startswith(f"{name}{{"):
            return float(line.rpartition(" ")[2])
    raise AssertionError(f"no {name} in /metrics")


async def preemptions(app: RuntimeApp) -> float:
    return await counter(app, "clowder_runtime_preemptions_total")


def assert_counts_consistent(stream: Stream) -> None:
    """Cumulative token counts never go back, and the last message's equals the usage."""
    counts = [m.completion_tokens for m in stream.messages]
    assert counts == sorted(counts)
    assert stream.last.completion_tokens == stream.last.usage.completion_tokens


@dataclass
class Job:
    job: GenerationJob


def job(name: str, priority: Priority) -> Job:
    return Job(GenerationJob(request_id=name, sampling=SamplingSettings(), prompt="x", priority=priority))


@pytest.mark.unit
def test_the_wait_queue_admits_interactive_work_first_and_requeued_work_ahead_of_its_class():
    queue: WaitQueue[Job] = WaitQueue()
    b1, b2, i1, i2, resumed = (job("b1", Priority.BATCH), job("b2", Priority.BATCH), job("i1", Priority.INTERACTIVE),
                               job("i2", Priority.INTERACTIVE), job("resumed", Priority.BATCH))
    for item in (b1, i1, b2, i2):
        queue.append(item)
    queue.requeue(resumed)
    assert [j.job.request_id for j in queue] == ["i1", "i2", "resumed", "b1", "b2"]
    assert (len(queue), queue.head_priority()) == (5, Priority.INTERACTIVE)
    # A new interactive request counts only the interactive work ahead of it against the queue's bound.
    assert (queue.count_at_or_above(Priority.INTERACTIVE), queue.count_at_or_above(Priority.BATCH)) == (2, 5)
    queue.remove(i2)
    with pytest.raises(ValueError):
        queue.remove(i2)
    assert [queue.popleft().job.request_id for _ in range(4)] == ["i1", "resumed", "b1", "b2"]
    assert not queue and queue.head_priority() is None
    with pytest.raises(IndexError):
        queue.popleft()


@pytest.mark.unit
@pytest.mark.parametrize("name, running, waiting, expected", [
    ("only a less urgent sequence is preempted", [("i", Priority.INTERACTIVE, 5)], Priority.INTERACTIVE, None),
    ("batch work never preempts batch work", [("b", Priority.BATCH, 5)], Priority.BATCH, None),
    ("the cheapest to recompute", [("b1", Priority.BATCH, 90), ("i", Priority.INTERACTIVE, 3),
                                   ("b2", Priority.BATCH, 40)], Priority.INTERACTIVE, "b2"),
    ("on a tie the later one", [("b1", Priority.BATCH, 40), ("b2", Priority.BATCH, 40)], Priority.INTERACTIVE, "b2"),
    ("nothing running", [], Priority.INTERACTIVE, None),
])
def test_preemption_victim(name, running, waiting, expected):
    assert preemption_victim(running, waiting) == expected, name


@pytest.mark.unit
def test_an_unknown_priority_is_refused_naming_the_field():
    with pytest.raises(InvalidArgument) as err:
        build_job(completion("Hello", 7), resources_pb2.ImageConfiguration())
    assert [v.field for v in err.value.violations] == ["priority"]
    assert build_job(completion("Hello", BATCH), resources_pb2.ImageConfiguration()).priority is Priority.BATCH
    assert build_job(completion("Hello"), resources_pb2.ImageConfiguration()).priority is Priority.INTERACTIVE


@pytest.mark.inprocess
async def test_an_interactive_request_gets_its_first_token_while_batch_requests_hold_every_slot(model_path):
    async with serving(model_path) as (app, stub):
        batch = [Stream.start(stub, completion(p, BATCH, temperature=0, max_tokens=400)) for p in STORIES]
        await wait_for(lambda: all(s.tokens >= 4 for s in batch), 60, "every batch request decoding", interval=0.01)
        assert (await stats(stub)).num_requests_running == SLOTS

        interactive = Stream.start(stub, completion("The capital of France is", temperature=0, max_tokens=8))
        await interactive.finished(60)
        assert interactive.first_text_at is not None
        ttft = interactive.first_text_at - interactive.sent_at
        # It took a slot from a batch sequence: none of them had finished (or given up its slot) by then.
        assert all(s.done_at is None or s.done_at > interactive.first_text_at for s in batch)
        assert await preemptions(app) >= 1

        for stream in batch:
            await stream.finished()
            assert stream.last.finish_reason == runtime_pb2.FINISH_REASON_LENGTH
            assert stream.last.usage.completion_tokens == 400
            assert_counts_consistent(stream)
        remaining = max(s.done_at for s in batch if s.done_at) - interactive.first_text_at
        # Without priority it waits for a slot, i.e. about `remaining`.
        assert ttft < remaining / 4, (ttft, remaining)


@pytest.mark.inprocess
async def test_an_interactive_request_cuts_short_a_batch_prefill_step_which_is_then_redone_unchanged(model_path):
    # One chunk of about 1,300 prompt tokens: seconds of a single decode step on one thread.
    prompt = "The keepers of the lighthouse wrote in their logbook every night, whatever the weather. " * 80
    request = completion(prompt, BATCH, temperature=0, max_tokens=24, logprobs=True)
    options = {"context_size": 2048, "prefill_chunk": 2048}
    async with serving(model_path, **options) as (_, stub):
        reference = await Stream.start(stub, request).finished()

    async with serving(model_path, **options) as (app, stub):
        batch = Stream.start(stub, request)
        await wait_for_stats(stub, lambda s: s.num_requests_running == 1)
        interactive = await Stream.start(stub, completion("The capital of France is", temperature=0,
                                                          max_tokens=4)).finished(60)
        await batch.finished()
        # Without the abort the batch prompt's step ends first, and its first token with it.
        assert batch.first_text_at is not None and interactive.first_text_at is not None
        assert interactive.first_text_at < batch.first_text_at
        assert await counter(app, "clowder_runtime_aborted_steps_total") >= 1
        # The batch request took its slot at once: nothing was preempted, its step was redone.
        assert await preemptions(app) == 0

    assert batch.text == reference.text
    assert [m.logprobs for m in batch.messages if m.logprobs] == [m.logprobs for m in reference.messages if m.logprobs]
    assert batch.last.usage == reference.last.usage


FIRST_TURN = "Name three colours."


def next_turn(answer: str) -> runtime_pb2.GenerateRequest:
    """The conversation's second turn after `chat(FIRST_TURN)` was answered with `answer`."""
    turns = [runtime_pb2.ChatMessage(role="user", content=FIRST_TURN),
             runtime_pb2.ChatMessage(role="assistant", content=answer),
             runtime_pb2.ChatMessage(role="user", content="And three animals?")]
    return runtime_pb2.GenerateRequest(request_id="turn-2", chat=runtime_pb2.ChatInput(messages=turns),
                                       sampling=runtime_pb2.SamplingParams(temperature=0, max_tokens=4))


@pytest.mark.inprocess
async def test_batch_work_leaves_a_conversations_cache_alone_while_another_slot_is_free(model_path):
    async with serving(model_path) as (_, stub):
        first = await Stream.start(stub, chat(FIRST_TURN, temperature=0, max_tokens=16)).finished()
        # It shares the chat template's opening with the conversation: without the rule it would take (and cut
        # down) the conversation's slot, the one with the longest common prefix.
        await Stream.start(stub, chat("Describe the sea.", BATCH, temperature=0, max_tokens=16)).finished()
        second = await Stream.start(stub, next_turn(first.text)).finished()
    # The next turn finds the whole first prompt still cached.
    assert second.last.usage.cached_prompt_tokens >= first.last.usage.prompt_tokens


@pytest.mark.inprocess
async def test_batch_work_waits_a_little_rather_than_take_the_only_free_slot_from_a_conversation(model_path):
    async with serving(model_path) as (_, stub):
        longs = [Stream.start(stub, completion(p, BATCH, temperature=0, max_tokens=300)) for p in STORIES[:SLOTS - 1]]
        await wait_for(lambda: all(s.tokens >= 2 for s in longs), 60, "the long batch requests decoding",
                       interval=0.01)
        first = await Stream.start(stub, chat(FIRST_TURN, temperature=0, max_tokens=16)).finished()
        # The conversation's slot is the only free one: the batch request waits rather than take it.
        waiting = Stream.start(stub, chat("Describe the sea.", BATCH, temperature=0, max_tokens=8))
        await wait_for_stats(stub, lambda s: s.num_requests_waiting == 1)
        # Several steps of the long requests: without the rule it would have taken the free slot by now.
        await asyncio.sleep(0.3)
        assert (await stats(stub)).num_requests_waiting == 1
        second = await Stream.start(stub, next_turn(first.text)).finished()
        assert second.last.usage.cached_prompt_tokens >= first.last.usage.prompt_tokens
        # The wait is short: the batch request runs (in the conversation's slot, once its hold is over).
        assert (await waiting.finished(60)).last.usage.completion_tokens == 8
        assert all(s.done_at is None for s in longs)
        for stream in longs:
            stream.call.cancel()


@pytest.mark.inprocess
async def test_preempted_sequences_finish_with_the_text_of_an_unpreempted_run(model_path, monkeypatch):
    # Batch work takes the slot an interactive request left at once (no hold for a conversation, which has its
    # own test): every slot stays held, so each interactive request below has to preempt.
    monkeypatch.setattr(engine, "_BATCH_HOLD_S", 0.0)
    requests = [
        # Temperature 0 with logprobs: one entry per token, so a token repeated or lost would show.
        completion(STORIES[0], BATCH, temperature=0, max_tokens=96, logprobs=True),
        # A seed: the sampler's random state goes on across the preemption.
        completion(STORIES[1], BATCH, temperature=0.9, seed=1234, max_tokens=96),
        # A stop string that ends the output (held-back text survives the preemption).
        chat("Describe the sea in five sentences.", BATCH, temperature=0, max_tokens=96, stop=["horizon."]),
        # More requests than slots: one waits, and takes the slot the short one above leaves, so every slot stays
        # held and each interactive request below has to preempt.
        completion("The history of the lighthouse:", BATCH, temperature=0, max_tokens=96, logprobs=True),
        completion(STORIES[2], BATCH, temperature=0, max_tokens=96, logprobs=True),
    ]
    async with serving(model_path) as (_, stub):
        # Unpreempted: the same requests batched together (equal to single-sequence runs, test_runtime_batching).
        alone = [Stream.start(stub, r) for r in requests]
        expected = [await s.finished() for s in alone]

    async with serving(model_path) as (app, stub):
        batch = [Stream.start(stub, r) for r in requests]
        for round_ in range(4):
            # Every slot held by a sequence some tokens further on: the next interactive request preempts one
            # of them mid-stream (the one preempted last resumes once the interactive one is done).
            progress = 8 + 16 * round_

            def ready(p: int = progress) -> bool:
                going = [s for s in batch if s.done_at is None]
                return not going or sum(s.tokens >= p for s in going) >= min(SLOTS, len(going))

            await wait_for(ready, 120, f"batch requests at {progress} tokens", interval=0.01)
            if all(s.done_at is not None for s in batch):
                break
            interactive = Stream.start(stub, completion(f"Question {round_}: the capital of France is",
                                                        temperature=0, max_tokens=12))
            await interactive.finished(60)
        got = [await s.finished() for s in batch]
        assert await preemptions(app) >= 3

    for result, reference in zip(got, expected):
        assert result.text == reference.text
        assert result.last.finish_reason == reference.last.finish_reason
        assert result.last.usage.completion_tokens == reference.last.usage.completion_tokens
        assert result.last.usage.prompt_tokens == reference.last.usage.prompt_tokens
        assert_counts_consistent(result)
    for result, request in zip(got, requests):
        if request.sampling.logprobs:
            logprobs = [lp for m in result.messages for lp in m.logprobs]
            assert len(logprobs) == result.last.usage.completion_tokens
            assert b"".join(lp.bytes for lp in logprobs).decode() == result.text
    assert got[2].last.finish_reason == runtime_pb2.FINISH_REASON_STOP and "horizon." not in got[2].text


@pytest.mark.inprocess
async def test_a_preempted_request_can_be_cancelled_while_it_waits_to_resume(model_path):
    # Two long prompts and a short one: the short one is the cheapest to recompute, so it is preempted.
    long_prompt = "The keepers of the lighthouse wrote in their logbook every night. " * 6
    async with serving(model_path) as (app, stub):
        longs = [Stream.start(stub, completion(f"{long_prompt}Entry {i}:", BATCH, temperature=0, max_tokens=400))
                 for i in range(SLOTS - 1)]
        short = Stream.start(stub, completion(STORIES[0], BATCH, temperature=0, max_tokens=400))
        batch = [*longs, short]
        await wait_for(lambda: all(s.tokens >= 2 for s in batch), 60, "every batch request decoding", interval=0.01)

        interactive = Stream.start(stub, completion("Once upon a time", temperature=0, max_tokens=300))
        await wait_for(lambda: interactive.tokens >= 1, 30, "the interactive request's first token", interval=0.01)
        await wait_for_stats(stub, lambda s: s.num_requests_waiting == 1 and s.num_requests_running == SLOTS)
        assert await preemptions(app) == 1
        stalled_at = short.tokens
        short.call.cancel()
        await wait_for_stats(stub, lambda s: s.num_requests_waiting == 0)
        assert short.tokens == stalled_at

        # The others go on and end normally; the replica is left empty and serves the next request.
        await interactive.finished()
        assert interactive.last.usage.completion_tokens == 300
        for stream in longs:
            await stream.finished()
            assert stream.last.usage.completion_tokens == 400
        await wait_for_stats(stub, lambda s: s.num_requests_running == 0 and s.kv_cache_usage_perc == 0)
        after = await Stream.start(stub, completion("Hello", BATCH, temperature=0, max_tokens=4)).finished(60)
        assert after.last.usage.completion_tokens == 4


@pytest.mark.processes
@pytest.mark.e2e
@pytest.mark.timeout(900)
def test_interactive_requests_go_first_while_a_batch_fills_the_replica(tmp_path):
    """`clowder up --demo`: a batch whose lines hold every slot the batch worker may take (the demo's 16 less the
    one held back), and bursts of three interactive streams: the batch worker's PRIORITY_BATCH travels through the
    balancer's pipeline, so the runtime preempts batch lines for them and they get their first token quickly."""
    with up_cluster(tmp_path / "clowder", wide_console=False) as cluster:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{cluster.http_port}/v1", api_key="unused", timeout=300,
                               max_retries=0)
        client.chat.completions.create(model="smol", messages=[{"role": "user", "content": "Hi"}], max_tokens=2)
        # More lines than batch slots: a second wave follows the first.
        lines = chat_lines(20, max_tokens=32)
        started = time.monotonic()
        batch = client.batches.create(input_file_id=upload(client, lines).id, endpoint="/v1/chat/completions",
                                      completion_window="24h")
        poll(client, batch.id, lambda b: b.status != "validating", 60, "started")
        # The worker sends the first wave within a poll of its capacity (a fraction of a second).
        time.sleep(2)
        ttfts: list[float] = []

        def interactive(index: int) -> None:
            sent = time.monotonic()
            stream = client.chat.completions.create(
                model="smol", messages=[{"role": "user", "content": f"Name a colour ({index})."}], max_tokens=8,
                stream=True)
            first = None
            for chunk in stream:
                if first is None and chunk.choices and chunk.choices[0].delta.content:
                    first = time.monotonic() - sent
            assert first is not None
            ttfts.append(first)

        bursts = 0
        while bursts < 3 and client.batches.retrieve(batch.id).status == "in_progress":
            # Three at once: one finds the slot held back for interactive traffic, the others find every slot held.
            burst = [threading.Thread(target=interactive, args=(i,)) for i in range(3)]
            for thread in burst:
                thread.start()
            for thread in burst:
                thread.join(300)
            bursts += 1
            time.sleep(1)
        done = ended(client, batch.id, timeout=600)
        elapsed = time.monotonic() - started
        assert done.status == "completed", done
        output = lines_of(client, done.output_file_id)
        assert sorted(custom_ids(output)) == sorted(line["custom_id"] for line in lines)
        assert all(line["response"]["status_code"] == 200 for line in output)
        assert len(ttfts) == 3 * bursts and bursts >= 1
        ttfts.sort()
        # Waiting for a batch line to end would take a good part of a wave, i.e. of half the batch's time.
        assert ttfts[len(ttfts) // 2] < elapsed / 8, (ttfts, elapsed)
        logs = (tmp_path / "clowder").rglob("runtime-*.log")
        assert any("generation preempted" in p.read_text() for p in logs), "no batch line was preempted"
