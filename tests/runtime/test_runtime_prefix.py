"""Prefix block hashes: the chained scheme GetStats reports and routers recompute."""

from __future__ import annotations

import hashlib
import struct

import pytest

from clowder_runtime.prefix import HashedPrefix, block_hashes

pytestmark = pytest.mark.unit


def test_first_block_follows_the_documented_formula():
    tokens = list(range(100, 104))
    root = hashlib.sha256(b"").digest()[:8]
    expected = int.from_bytes(hashlib.sha256(root + struct.pack("<4i", *tokens)).digest()[:8], "little")
    assert block_hashes(tokens, "", block_tokens=4) == [expected]


def test_prompts_share_exactly_the_hashes_of_their_shared_blocks():
    shared = list(range(64))
    a = block_hashes(shared + [1] * 40, block_tokens=16)
    b = block_hashes(shared + [2] * 40, block_tokens=16)
    assert len(a) == len(b) == 6
    assert a[:4] == b[:4]
    assert set(a[4:]).isdisjoint(b[4:])
    # A partial last block is not hashed.
    assert len(block_hashes(list(range(31)), block_tokens=16)) == 1


def test_the_adapter_is_part_of_the_chain():
    tokens = list(range(32))
    assert set(block_hashes(tokens, "")).isdisjoint(block_hashes(tokens, "pirate"))


def test_incremental_hashes_match_after_growth_and_truncation():
    prefix = HashedPrefix("", block_tokens=8)
    tokens = list(range(30))
    prefix.update(tokens)
    assert prefix.hashes == block_hashes(tokens, block_tokens=8)
    del tokens[12:]
    prefix.truncate(len(tokens))
    tokens += [7] * 20
    prefix.update(tokens)
    assert prefix.hashes == block_hashes(tokens, block_tokens=8)
