"""Which replica has seen which prompt prefix: chained hashes of fixed-size text blocks, an LRU set per replica."""

from __future__ import annotations

import collections
import hashlib
import time
from typing import Callable, Iterable, Sequence

from clowder.runtime.v1 import runtime_pb2

# Characters per block: about 60 tokens of English; small enough that a shared system prompt spans a few blocks.
DEFAULT_BLOCK_CHARS = 256
# Blocks remembered per replica: a runtime's KV cache holds far fewer, so the oldest fall out first.
DEFAULT_CAPACITY = 8192


def render_chat(messages: Iterable[runtime_pb2.ChatMessage]) -> str:
    """Messages as one string whose prefixes follow the conversation's (as a chat template's output does)."""
    return "".join(f"<|{m.role}|>\n{m.content}\n" for m in messages)


def block_hashes(text: str, block_chars: int = DEFAULT_BLOCK_CHARS) -> tuple[int, ...]:
    """One hash per full block, each chained to the one before, so a hash stands for its whole prefix.

    blake2b rather than hash(): stable across processes, so figures from other sources can be compared.
    """
    out: list[int] = []
    previous = b""
    data = text.encode()
    for start in range(0, len(data) - block_chars + 1, block_chars):
        digest = hashlib.blake2b(previous + data[start:start + block_chars], digest_size=8).digest()
        out.append(int.from_bytes(digest, "big"))
        previous = digest
    return tuple(out)


class PrefixIndex:
    """Block hashes per replica address with when each was last sent there, least recently used dropped first."""

    def __init__(self, capacity: int = DEFAULT_CAPACITY, clock: Callable[[], float] = time.monotonic) -> None:
        self._capacity = max(1, capacity)
        self._clock = clock
        self._blocks: dict[str, collections.OrderedDict[int, float]] = {}

    def add(self, address: str, blocks: Sequence[int]) -> None:
        held = self._blocks.setdefault(address, collections.OrderedDict())
        now = self._clock()
        for block in blocks:
            held[block] = now
            held.move_to_end(block)
        while len(held) > self._capacity:
            held.popitem(last=False)

    def matched(self, address: str, blocks: Sequence[int]) -> int:
        """Leading blocks of `blocks` the replica holds (chained hashes: the first miss ends the prefix)."""
        held = self._blocks.get(address)
        if not held:
            return 0
        count = 0
        for block in blocks:
            if block not in held:
                break
            count += 1
        return count

    def replace(self, address: str, blocks: Iterable[int]) -> None:
        """Take a replica's own report of what it caches as the truth."""
        now = self._clock()
        self._blocks[address] = collections.OrderedDict((b, now) for b in blocks)

    def trim(self, address: str, keep: int, protect_after: float = float("inf")) -> None:
        """Drop a replica's least recently used blocks beyond `keep`, but none used after `protect_after`."""
        held = self._blocks.get(address)
        if held is None:
            return
        while len(held) > max(0, keep) and next(iter(held.values())) <= protect_after:
            held.popitem(last=False)

    def forget(self, address: str) -> None:
        self._blocks.pop(address, None)

    def size(self, address: str) -> int:
        return len(self._blocks.get(address, ()))
