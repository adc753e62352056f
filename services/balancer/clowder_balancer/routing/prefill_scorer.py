"""Prefill work: how much prompt a replica must evaluate before this request's first token, in prompt blocks.

That is the blocks of the prompt the replica is not believed to hold in its KV cache, plus the blocks still
to evaluate of requests already routed there that have not had their first token. Prefix affinity and load
in one unit: a conversation goes back to the replica holding its history unless that replica has more
prompt to get through first than evaluating the whole history elsewhere would cost; and new conversations
that share only a system prompt spread out instead of queueing behind each other's prefill.
"""

from __future__ import annotations

import time
from typing import Callable, Sequence

from clowder_balancer.routing.base import Candidate, RouteRequest
from clowder_balancer.routing.prefix_index import DEFAULT_BLOCK_CHARS, PrefixIndex
from clowder_balancer.routing.prefix_scorer import PrefixScorer


class PrefillScorer(PrefixScorer):
    """Scores (least work + 1) / (work + 1): 1 for the replica with the least prefill ahead, falling with
    the work (relative to the best, so the weight against other scorers does not depend on prompt size)."""

    name = "prefill"

    def __init__(self, index: PrefixIndex | None = None, block_chars: int = DEFAULT_BLOCK_CHARS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(index, block_chars, clock)
        # Blocks still to evaluate per address, and what each open routing added, to take it back once.
        self._pending: dict[str, int] = {}
        self._open: dict[tuple[int, str], list[int]] = {}

    def pending(self, address: str) -> int:
        return self._pending.get(address, 0)

    def _uncached(self, address: str, blocks: Sequence[int]) -> int:
        return len(blocks) - self.index.matched(address, blocks)

    def score(self, request: RouteRequest, candidates: Sequence[Candidate]) -> dict[str, float]:
        work = {c.address: self._pending.get(c.address, 0) + self._uncached(c.address, request.blocks)
                for c in candidates}
        least = min(work.values(), default=0)
        return {address: (least + 1) / (w + 1) for address, w in work.items()}

    def routed(self, request: RouteRequest, chosen: Candidate) -> None:
        # Every request costs something to start, even one shorter than a block.
        added = max(1, self._uncached(chosen.address, request.blocks))
        super().routed(request, chosen)
        self._pending[chosen.address] = self._pending.get(chosen.address, 0) + added
        self._open.setdefault((id(request), chosen.address), []).append(added)

    def prefilled(self, request: RouteRequest, chosen: Candidate) -> None:
        """The request's first token came (or its attempt ended): its prompt is no longer ahead of others."""
        key = (id(request), chosen.address)
        added = self._open.get(key)
        if not added:
            return
        amount = added.pop()
        if not added:
            del self._open[key]
        left = self._pending.get(chosen.address, 0) - amount
        if left > 0:
            self._pending[chosen.address] = left
        else:
            self._pending.pop(chosen.address, None)

    def forget(self, address: str) -> None:
        super().forget(address)
        self._pending.pop(address, None)
        for key in [k for k in self._open if k[1] == address]:
            del self._open[key]
