"""Builds a small LoRA adapter GGUF for the bundled SmolLM2 with the `gguf` package (test helper)."""

from __future__ import annotations

import pathlib

import gguf
import numpy as np

# SmolLM2-135M: 30 layers, 576-wide embeddings, attn_v maps 576 -> 192 (3 KV heads of 64).
LAYERS = 30
N_EMBD = 576
N_V = 192


def write_lora_adapter(path: pathlib.Path, rank: int = 8, scale: float = 0.2, seed: int = 0) -> pathlib.Path:
    """Random low-rank deltas on every layer's attn_v, strong enough to change greedy output.

    Tensor shapes follow llama.cpp's check: for a weight of ggml shape [n_in, n_out],
    lora_a is [n_in, rank] and lora_b is [rank, n_out] (numpy shapes are reversed).
    """
    rng = np.random.default_rng(seed)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_string("general.type", "adapter")
    writer.add_string("adapter.type", "lora")
    writer.add_float32("adapter.lora.alpha", float(rank))
    for layer in range(LAYERS):
        name = f"blk.{layer}.attn_v.weight"
        writer.add_tensor(f"{name}.lora_a", (rng.standard_normal((rank, N_EMBD)) * scale).astype(np.float32))
        writer.add_tensor(f"{name}.lora_b", (rng.standard_normal((N_V, rank)) * scale).astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
