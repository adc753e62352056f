"""Embed against the real bundled model through a real gRPC client."""

from __future__ import annotations

import asyncio

import grpc
import numpy as np
import pytest
from clowder.controller.v1 import resources_pb2
from clowder.runtime.v1 import runtime_pb2

from clowder_common.errors import InvalidArgument, from_rpc_error
from clowder_runtime.config import RuntimeConfig
from clowder_runtime.embeddings import EMBED_SEQUENCES
from clowder_runtime.validation import MAX_EMBED_INPUTS
from runtime_helpers import running_runtime

pytestmark = pytest.mark.inprocess

CONTEXT_SIZE = 128
# SmolLM2-135M's hidden size.
N_EMBD = 576


@pytest.fixture(scope="module")
async def runtime(model_path):
    config = RuntimeConfig(model_path=str(model_path), context_size=CONTEXT_SIZE, threads=1, slots=1)
    async with running_runtime(config, resources_pb2.ImageConfiguration()) as app:
        yield app


async def embed(stub, *inputs: str) -> tuple[np.ndarray, int]:
    response = await stub.Embed(runtime_pb2.EmbedRequest(request_id="e", inputs=list(inputs)))
    return np.array([e.values for e in response.embeddings]), response.prompt_tokens


async def test_vectors_are_unit_length_model_sized_and_repeatable(stub):
    vectors, _ = await embed(stub, "The cat sat on the mat.", "The cat sat on the mat.")
    assert vectors.shape == (2, N_EMBD)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    again, _ = await embed(stub, "The cat sat on the mat.")
    np.testing.assert_allclose(vectors[0], vectors[1], atol=1e-5)
    assert again[0] @ vectors[0] > 0.9999


async def test_similar_sentences_are_closer_than_unrelated_ones(stub):
    vectors, _ = await embed(
        stub,
        "The cat is sleeping on the sofa.",
        "A cat naps on the couch.",
        "Quarterly revenue rose by eight percent in the fiscal year.",
    )
    similar, unrelated = vectors[0] @ vectors[1], vectors[0] @ vectors[2]
    assert similar > unrelated


async def test_order_is_kept_and_each_input_is_its_own_sequence(stub):
    texts = [f"Sentence number {i} is about {'apples' if i % 2 else 'rockets'}." for i in range(EMBED_SEQUENCES + 5)]
    together, tokens = await embed(stub, *texts)
    alone = [await embed(stub, text) for text in texts]
    singles = np.array([v[0] for v, _ in alone])
    # Batched and single evaluation differ only by rounding (cosine 0.9999), and each vector
    # is nearest to its own input's: no position mixed up, no sequence attending to another.
    similarity = together @ singles.T
    assert np.all(np.diag(similarity) > 0.999)
    assert list(similarity.argmax(axis=1)) == list(range(len(texts)))
    assert tokens == sum(t for _, t in alone)


async def test_prompt_tokens_count_every_input(stub, runtime):
    _, one = await embed(stub, "hello world")
    _, two = await embed(stub, "hello world", "hello world")
    assert one == len(runtime.engine.tokenize_prompt("hello world"))
    assert two == 2 * one


async def test_embedding_runs_beside_a_generation(stub):
    request = runtime_pb2.GenerateRequest(
        request_id="g", prompt="Once upon a time", sampling=runtime_pb2.SamplingParams(temperature=0.0, max_tokens=32))
    generation = asyncio.ensure_future(_collect(stub.Generate(request)))
    vectors, _ = await embed(stub, "side by side")
    responses = await generation
    assert vectors.shape == (1, N_EMBD)
    assert responses[-1].usage.completion_tokens == 32


async def _collect(call):
    return [r async for r in call]


@pytest.mark.parametrize(
    ("inputs", "field"),
    [
        ([], "inputs"),
        (["fine", ""], "inputs[1]"),
        (["x"] * (MAX_EMBED_INPUTS + 1), "inputs"),
        (["fine", "word " * (CONTEXT_SIZE + 10)], "inputs[1]"),
    ],
)
async def test_bad_inputs_are_invalid_argument_naming_the_field(stub, inputs, field):
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Embed(runtime_pb2.EmbedRequest(request_id="e", inputs=inputs))
    error = from_rpc_error(caught.value)
    assert isinstance(error, InvalidArgument)
    assert [v.field for v in error.violations] == [field]
