"""Adapter tests reuse the runtime tests' LoRA writer (tests/runtime/runtime_lora.py)."""

from __future__ import annotations

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "runtime"))
