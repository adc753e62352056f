"""Slots, threads, context and batch size in the runtime: its flags over the image's, the defaults, the bounds."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from clowder.controller.v1 import resources_pb2

from clowder_common.errors import InvalidArgument
from clowder_common.runtime_settings import DEFAULT_BATCH_SIZE, DEFAULT_CONTEXT_SIZE, DEFAULT_SLOTS, RuntimeSettings
from clowder_runtime.app import create_runtime, runtime_settings
from clowder_runtime.config import RuntimeConfig


@pytest.mark.unit
def test_flags_win_over_the_image_and_the_defaults_fill_the_rest():
    image = resources_pb2.ImageConfiguration(slots=2, threads=3, context_size=512, batch_size=64)
    assert runtime_settings(RuntimeConfig(), image) == RuntimeSettings(2, 3, 512, 64)
    assert runtime_settings(RuntimeConfig(slots=8, prefill_chunk=128), image) == RuntimeSettings(8, 3, 512, 128)
    # Nothing set: 8 slots of 2048 tokens, 256-token prefill steps; threads 0 is every CPU.
    assert runtime_settings(RuntimeConfig(), resources_pb2.ImageConfiguration()) == RuntimeSettings(
        DEFAULT_SLOTS, 0, DEFAULT_CONTEXT_SIZE, DEFAULT_BATCH_SIZE)
    assert DEFAULT_SLOTS == 8


@pytest.mark.inprocess
@pytest.mark.parametrize("config, image, field", [
    (RuntimeConfig(slots=-1), {}, "slots"),
    (RuntimeConfig(slots=300), {}, "slots"),
    (RuntimeConfig(), {"slots": 257}, "slots"),
    (RuntimeConfig(threads=513), {}, "threads"),
    (RuntimeConfig(context_size=8), {}, "context_size"),
    (RuntimeConfig(prefill_chunk=-5), {}, "prefill_chunk"),
    (RuntimeConfig(burst_gap_ms=-1), {}, "burst_gap_ms"),
    (RuntimeConfig(burst_wait_max_ms=-0.5), {}, "burst_wait_max_ms"),
    (RuntimeConfig(burst_gap_ms=float("nan")), {}, "burst_gap_ms"),
    (RuntimeConfig(burst_wait_max_ms=float("inf")), {}, "burst_wait_max_ms"),
])
async def test_out_of_range_settings_are_refused_naming_the_field(model_path, config, image, field):
    config = RuntimeConfig(**{**config.__dict__, "model_path": str(model_path)})
    with pytest.raises(InvalidArgument) as caught:
        await create_runtime(config, resources_pb2.ImageConfiguration(**image))
    assert caught.value.violations[0].field == field


@pytest.mark.processes
def test_a_context_beyond_the_models_training_context_stops_the_runtime_with_the_field(model_path, tmp_path):
    """llama.cpp would accept it and produce garbage past 8192 positions; the runtime refuses at load."""
    argv = [sys.executable, "-m", "clowder_runtime", "--model-path", str(model_path), "--listen", "127.0.0.1:0",
            "--threads", "1", "--slots", "1", "--context-size", "16384"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120, env=dict(os.environ))
    assert done.returncode == 1
    assert "context_size 16384 does not fit the model: it was trained for 8192 tokens" in done.stderr
