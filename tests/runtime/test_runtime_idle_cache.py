"""Idle slots keep their prefix caches only within idle_cache_tokens, most recently used first."""

from __future__ import annotations

import pytest
from clowder.controller.v1 import resources_pb2
from clowder.runtime.v1 import runtime_pb2

from clowder_runtime.config import RuntimeConfig
from runtime_helpers import running_runtime, runtime_stub

pytestmark = pytest.mark.inprocess

FIRST = "The history of the lighthouse of Brannoc, its keepers and the storms of the northern coast, begins"
SECOND = "A recipe for country bread: flour, water, salt and a sourdough starter, mixed the evening before, then"


async def serve_and_repeat(model_path, budget: int) -> list[int]:
    """Cached prompt tokens of FIRST, SECOND, FIRST, FIRST on a two-slot replica."""
    config = RuntimeConfig(model_path=str(model_path), context_size=256, threads=1, slots=2, idle_cache_tokens=budget)
    async with running_runtime(config, resources_pb2.ImageConfiguration()) as app, runtime_stub(app) as stub:
        cached = []
        for prompt in (FIRST, SECOND, FIRST, FIRST):
            request = runtime_pb2.GenerateRequest(
                request_id="c", prompt=prompt, sampling=runtime_pb2.SamplingParams(temperature=0.0, max_tokens=2))
            responses = [r async for r in stub.Generate(request)]
            cached.append(responses[-1].usage.cached_prompt_tokens)
        return cached


async def test_only_the_most_recent_idle_caches_within_the_budget_are_kept(model_path):
    # Each prompt plus its output is about 25 tokens: room for one idle cache, not two.
    first, second, first_again, first_third_time = await serve_and_repeat(model_path, budget=40)
    assert first == second == 0
    assert first_again == 0, "the older cache should have been dropped"
    assert first_third_time > 15, "the most recent cache should have been kept"


async def test_a_budget_for_both_keeps_both(model_path):
    cached = await serve_and_repeat(model_path, budget=512)
    assert cached[2] > 15 and cached[3] > 15


async def test_a_zero_budget_keeps_nothing(model_path):
    assert await serve_and_repeat(model_path, budget=0) == [0, 0, 0, 0]
