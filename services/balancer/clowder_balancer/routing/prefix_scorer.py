"""Prefix-cache affinity: the share of the prompt's leading blocks a replica is believed to hold in its KV cache."""

from __future__ import annotations

import math
import time
from typing import Any, Callable, ClassVar, Mapping, Self, Sequence

from clowder_common.plugins import Plugin, parse_params

from clowder_balancer.routing.base import (
    BlockReader, Candidate, Observer, RouteRequest, RoutingEnv, Scorer, StatsConsumer,
)
from clowder_balancer.routing.prefix_index import DEFAULT_BLOCK_CHARS, PrefixIndex


# Rough characters per token of English text, to compare the runtime's token blocks with our text blocks.
CHARS_PER_TOKEN = 4
# Keep this many times what the estimate says the runtime holds: a stale guess costs one cold prefill (what
# no affinity costs anyway), forgetting a prefix the runtime still holds costs the same and is likelier.
SLACK = 2
# A report is a snapshot taken while requests we just routed may still be prefilling: blocks sent this
# recently are never trimmed on the strength of it.
PROTECT_S = 30.0


class PrefixScorer(Plugin, Scorer, Observer, StatsConsumer, BlockReader):
    TYPE: ClassVar[str] = "prefix"

    @classmethod
    def create(cls, params: Mapping[str, Any], env: RoutingEnv) -> Self:
        parse_params(cls.Params, params)
        return cls(block_chars=env.block_chars)

    def __init__(self, index: PrefixIndex | None = None, block_chars: int = DEFAULT_BLOCK_CHARS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.index = index or PrefixIndex(clock=clock)
        self.block_chars = block_chars
        self._clock = clock

    def score(self, request: RouteRequest, candidates: Sequence[Candidate]) -> dict[str, float]:
        if not request.blocks:
            return {c.address: 0.0 for c in candidates}
        total = len(request.blocks)
        return {c.address: self.index.matched(c.address, request.blocks) / total for c in candidates}

    def routed(self, request: RouteRequest, chosen: Candidate) -> None:
        # Recorded at routing time so the next turn of a conversation already sent finds it here.
        self.index.add(chosen.address, request.blocks)

    def prefilled(self, request: RouteRequest, chosen: Candidate) -> None:
        pass  # what the replica holds was recorded when the request was routed

    def finished(self, request: RouteRequest, chosen: Candidate, blocks: tuple[int, ...]) -> None:
        # Prompt plus answer: the next turn's history starts with exactly this text.
        self.index.add(chosen.address, blocks)

    def forget(self, address: str) -> None:
        self.index.forget(address)

    def runtime_report(self, address: str, stats: Any) -> None:
        """Correct the guess with what the runtime says it holds.

        Its hashes are over token ids, which the balancer cannot compute without the tokenizer; what
        it can use is how much the runtime holds: an empty cache (a restart, an eviction) empties our
        entry, and a small one trims it to about as many text blocks as the runtime keeps tokens.
        """
        tokens_per_block = getattr(stats, "prefix_block_tokens", 0)
        if not tokens_per_block:
            return  # a runtime that does not report: keep guessing
        held_chars = stats.prefix_blocks * tokens_per_block * CHARS_PER_TOKEN
        self.index.trim(address, SLACK * math.ceil(held_chars / self.block_chars),
                        protect_after=self._clock() - PROTECT_S)
