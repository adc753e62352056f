"""Logprobs of generated tokens through the real gRPC servicer and the real bundled model."""

from __future__ import annotations

import math

import grpc
import pytest
from clowder.controller.v1 import resources_pb2
from clowder.runtime.v1 import runtime_pb2

from clowder_common.errors import InvalidArgument, from_rpc_error
from clowder_runtime.config import RuntimeConfig
from runtime_helpers import running_runtime, runtime_stub

pytestmark = pytest.mark.inprocess

PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
async def stub(model_path):
    config = RuntimeConfig(model_path=str(model_path), context_size=256, threads=1, slots=2)
    async with running_runtime(config, resources_pb2.ImageConfiguration()) as app, runtime_stub(app) as stub:
        yield stub


async def generate(stub, **sampling) -> list[runtime_pb2.GenerateResponse]:
    request = runtime_pb2.GenerateRequest(request_id="lp", prompt=PROMPT, sampling=runtime_pb2.SamplingParams(**sampling))
    return [r async for r in stub.Generate(request)]


def entries(responses: list[runtime_pb2.GenerateResponse]) -> list[runtime_pb2.TokenLogprob]:
    return [lp for r in responses for lp in r.logprobs]


async def test_each_generated_token_has_its_logprob_and_greedy_picks_the_top_alternative(stub):
    responses = await generate(stub, temperature=0.0, max_tokens=12, logprobs=True, top_logprobs=20)
    entries = [lp for r in responses for lp in r.logprobs]
    assert len(entries) == responses[-1].usage.completion_tokens == 12
    assert b"".join(lp.bytes for lp in entries).decode() == "".join(r.text for r in responses)
    for lp in entries:
        assert lp.logprob <= 0.0
        assert len(lp.top_logprobs) == 20
        values = [t.logprob for t in lp.top_logprobs]
        assert values == sorted(values, reverse=True)
        assert all(v <= 0.0 for v in values)
        # Greedy takes the likeliest token of the raw distribution.
        assert lp.top_logprobs[0].bytes == lp.bytes
        assert lp.top_logprobs[0].logprob == pytest.approx(lp.logprob)
        mass = sum(math.exp(v) for v in values)
        assert 0.3 < mass <= 1.0 + 1e-4


async def test_logprobs_are_of_the_raw_distribution_not_of_the_sampling_settings(stub):
    [greedy] = entries(await generate(stub, temperature=0.0, max_tokens=1, logprobs=True))
    [hot] = entries(await generate(stub, temperature=1.9, top_k=1, max_tokens=1, logprobs=True))
    # top_k=1 makes the sampled token certain, yet the reported probability is the model's.
    assert hot.bytes == greedy.bytes
    assert hot.logprob == pytest.approx(greedy.logprob, abs=1e-4)
    assert greedy.logprob < -1e-3


async def test_logprobs_without_top_logprobs_carry_no_alternatives(stub):
    responses = await generate(stub, temperature=0.0, max_tokens=5, logprobs=True)
    entries = [lp for r in responses for lp in r.logprobs]
    assert len(entries) == 5
    assert all(not lp.top_logprobs for lp in entries)


async def test_requests_without_logprobs_carry_none(stub):
    responses = await generate(stub, temperature=0.0, max_tokens=8)
    assert responses[-1].usage.completion_tokens == 8
    assert all(not r.logprobs for r in responses)


async def test_tokens_held_back_for_a_stop_string_keep_their_logprobs(stub):
    plain = await generate(stub, temperature=0.0, max_tokens=12)
    text = "".join(r.text for r in plain)
    stop = text[len(text) // 2 :][:6]
    responses = await generate(stub, temperature=0.0, max_tokens=12, logprobs=True, stop=[stop])
    entries = [lp for r in responses for lp in r.logprobs]
    assert responses[-1].finish_reason == runtime_pb2.FINISH_REASON_STOP
    assert len(entries) == responses[-1].usage.completion_tokens
    assert stop not in "".join(r.text for r in responses)


@pytest.mark.parametrize(
    "sampling",
    [{"logprobs": True, "top_logprobs": 21}, {"top_logprobs": 3}],
)
async def test_bad_top_logprobs_is_invalid_argument_naming_the_field(stub, sampling):
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await generate(stub, **sampling)
    error = from_rpc_error(caught.value)
    assert isinstance(error, InvalidArgument)
    assert [v.field for v in error.violations] == ["top_logprobs"]
