"""Prefix block hashes: how a KV cache's contents are named for routing (the scheme is documented in runtime.proto)."""

from __future__ import annotations

import hashlib
import struct
from typing import Sequence

BLOCK_TOKENS = 32


def root_hash(adapter: str) -> int:
    """The chain's start: different adapters give different KV entries for the same tokens."""
    return int.from_bytes(hashlib.sha256(adapter.encode("utf-8")).digest()[:8], "little")


def next_hash(previous: int, block: Sequence[int]) -> int:
    data = previous.to_bytes(8, "little") + struct.pack(f"<{len(block)}i", *block)
    return int.from_bytes(hashlib.sha256(data).digest()[:8], "little")


def block_hashes(tokens: Sequence[int], adapter: str = "", block_tokens: int = BLOCK_TOKENS) -> list[int]:
    """Chained hashes of every full block of `tokens`; a prompt and a cache share the first k hashes
    exactly when they share the first k blocks."""
    hashes: list[int] = []
    current = root_hash(adapter)
    for start in range(0, len(tokens) - block_tokens + 1, block_tokens):
        current = next_hash(current, tokens[start : start + block_tokens])
        hashes.append(current)
    return hashes


class HashedPrefix:
    """Block hashes of a growing (or truncated) token list, updated incrementally."""

    def __init__(self, adapter: str = "", block_tokens: int = BLOCK_TOKENS) -> None:
        self.adapter = adapter
        self.block_tokens = block_tokens
        self.hashes: list[int] = []

    def reset(self, adapter: str) -> None:
        self.adapter = adapter
        self.hashes = []

    def truncate(self, n_tokens: int) -> None:
        """The cache kept only its first `n_tokens`: blocks past them are gone."""
        del self.hashes[n_tokens // self.block_tokens :]

    def update(self, tokens: Sequence[int]) -> None:
        """`tokens` grew (call truncate first when it was cut): hash the blocks it completed."""
        full = len(tokens) // self.block_tokens
        current = self.hashes[-1] if self.hashes else root_hash(self.adapter)
        for index in range(len(self.hashes), full):
            start = index * self.block_tokens
            current = next_hash(current, tokens[start : start + self.block_tokens])
            self.hashes.append(current)
