"""Prefill work: how much prompt a replica must evaluate before this request's first token, in prompt blocks.

That is the blocks of the prompt the replica is not believed to hold in its KV cache, plus the blocks still
to evaluate of requests already routed there that have not had their first token. Prefix affinity and load
in one unit: a conversation goes back to the replica holding its history unless that replica has more
prompt to get through first than evaluating the whole history elsewhere would cost; and new conversations
that share only a system prompt spread out instead of queueing behind each other's prefill.
"""

from __future__ import annotations

import time
from typing import Callable, ClassVar, Sequence

from clowder_balancer.routing.base import Candidate, RouteRequest
from clowder_balancer.routing.prefix_index import DEFAULT_BLOCK_CHARS, PrefixIndex
from clowder_balancer.routing.prefix_scorer import PrefixScorer


# Prefills shorter than this (in blocks or seconds) say more about fixed costs than about speed.
RATE_MIN_BLOCKS = 2
RATE_MIN_SECONDS = 0.005
# Weight of the newest observation in a replica's prefill rate.
RATE_SMOOTHING = 0.3


class PrefillScorer(PrefixScorer):
    """Scores (least work + 1) / (work + 1): 1 for the replica with the least prefill ahead, falling with
    the work (relative to the best, so the weight against other scorers does not depend on prompt size)."""

    TYPE: ClassVar[str] = "prefill"

    def __init__(self, index: PrefixIndex | None = None, block_chars: int = DEFAULT_BLOCK_CHARS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(index, block_chars, clock)
        # Blocks routed per address and not yet prefilled, and what each open routing added (with when),
        # to take it back once.
        self._pending: dict[str, int] = {}
        # Per address, per request (its id): (blocks added, when) for each open routing there.
        self._open: dict[str, dict[int, list[tuple[int, float]]]] = {}
        # Blocks per second each replica was seen to prefill (moving average of finished prefills).
        self._rate: dict[str, float] = {}

    def pending(self, address: str) -> int:
        return self._pending.get(address, 0)

    def remaining(self, address: str) -> float:
        """Pending blocks less what the replica has likely prefilled since the oldest of them was routed.

        Counting a half-done prefill in full sent a conversation's next turn away from the replica holding
        its history, to evaluate all of it again elsewhere, rather than wait for the rest of the other.
        """
        pending = self._pending.get(address, 0)
        rate = self._rate.get(address)
        if not pending or not rate:
            return float(pending)
        oldest = min((when for opened in self._open.get(address, {}).values() for _, when in opened),
                     default=self._clock())
        return max(0.0, pending - rate * (self._clock() - oldest))

    def _uncached(self, address: str, blocks: Sequence[int]) -> int:
        return len(blocks) - self.index.matched(address, blocks)

    def score(self, request: RouteRequest, candidates: Sequence[Candidate]) -> dict[str, float]:
        work = {c.address: self.remaining(c.address) + self._uncached(c.address, request.blocks)
                for c in candidates}
        least = min(work.values(), default=0)
        return {address: (least + 1) / (w + 1) for address, w in work.items()}

    def routed(self, request: RouteRequest, chosen: Candidate) -> None:
        # Every request costs something to start, even one shorter than a block.
        added = max(1, self._uncached(chosen.address, request.blocks))
        super().routed(request, chosen)
        self._pending[chosen.address] = self._pending.get(chosen.address, 0) + added
        self._open.setdefault(chosen.address, {}).setdefault(id(request), []).append((added, self._clock()))

    def prefilled(self, request: RouteRequest, chosen: Candidate) -> None:
        """The request's first token came (or its attempt ended): its prompt is no longer ahead of others."""
        at_address = self._open.get(chosen.address, {})
        added = at_address.get(id(request))
        if not added:
            return
        amount, routed_at = added.pop()
        if not added:
            del at_address[id(request)]
            if not at_address:
                del self._open[chosen.address]
        elapsed = self._clock() - routed_at
        if amount >= RATE_MIN_BLOCKS and elapsed >= RATE_MIN_SECONDS:
            # Time to first token over the blocks evaluated: queueing behind others makes it an underestimate
            # of the replica's speed, which errs towards waiting less for others (the old behaviour).
            observed = amount / elapsed
            previous = self._rate.get(chosen.address)
            self._rate[chosen.address] = observed if previous is None else previous + RATE_SMOOTHING * (
                observed - previous)
        left = self._pending.get(chosen.address, 0) - amount
        if left > 0:
            self._pending[chosen.address] = left
        else:
            self._pending.pop(chosen.address, None)

    def forget(self, address: str) -> None:
        super().forget(address)
        self._pending.pop(address, None)
        self._rate.pop(address, None)
        self._open.pop(address, None)
