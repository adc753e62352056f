"""Request priority in the runtime: which waiting request a free slot takes, and which batch sequence gives its slot up."""

from __future__ import annotations

import codecs
import collections
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

from clowder_runtime.generation import GenerationJob, Priority
from clowder_runtime.model import Sampler
from clowder_runtime.stops import StopMatcher
from clowder_runtime.tools import ToolCallParser


class Queued(Protocol):
    job: GenerationJob


W = TypeVar("W", bound=Queued)
S = TypeVar("S")


class WaitQueue(Generic[W]):
    """Work waiting for a slot: one FIFO per priority, the more urgent class first.

    Shaped like the deque it replaced (append, popleft, remove, clear, len, iteration), so the engine's
    code that only counts or scans the queue needs no change. Iteration goes in admission order."""

    def __init__(self) -> None:
        self._classes: dict[Priority, collections.deque[W]] = {p: collections.deque() for p in sorted(Priority)}

    def append(self, work: W) -> None:
        self._classes[work.job.priority].append(work)

    def requeue(self, work: W) -> None:
        """A preempted sequence goes back to the head of its class: it already waited, and its output so far
        was sent, so it resumes before work that arrived after it (vLLM does the same)."""
        self._classes[work.job.priority].appendleft(work)

    def popleft(self) -> W:
        for queue in self._classes.values():
            if queue:
                return queue.popleft()
        raise IndexError("pop from an empty WaitQueue")

    def head_priority(self) -> Priority | None:
        """The class of the work admitted next; None when nothing waits."""
        for priority, queue in self._classes.items():
            if queue:
                return priority
        return None

    def remove(self, work: W) -> None:
        """Raises ValueError when `work` is not waiting, as deque.remove does."""
        self._classes[work.job.priority].remove(work)

    def clear(self) -> None:
        for queue in self._classes.values():
            queue.clear()

    def count_at_or_above(self, priority: Priority) -> int:
        """Waiting work that would be admitted before (or with) a new request of `priority`."""
        return sum(len(q) for p, q in self._classes.items() if p <= priority)

    def __len__(self) -> int:
        return sum(len(q) for q in self._classes.values())

    def __bool__(self) -> bool:
        return any(self._classes.values())

    def __iter__(self) -> Iterator[W]:
        for queue in self._classes.values():
            yield from list(queue)


@dataclass
class Suspended:
    """A preempted sequence: everything its slot held for it except the KV entries, which are recomputed
    when it takes a slot again (vLLM's recompute preemption).

    The sampler chain is kept, not rebuilt: its random state, penalty history and grammar state continue
    where they were, so a seeded or grammar-constrained stream goes on exactly as if never interrupted. The
    decoder, stop matcher and tool call parser keep what they held back (a partial UTF-8 character, text
    that may start a stop string), so the client's stream continues with no character repeated or lost."""

    # Tokens whose KV entries the sequence needs before it can go on: the prompt and every generated token
    # already in the cache (the next token to feed, if sampled, is `pending`).
    tokens: list[int]
    # The sampled token not yet in the cache; None when the last of `tokens` still has to be sampled from.
    pending: int | None
    sampler: Sampler
    n_prompt: int
    cached: int
    produced: int
    decoder: codecs.BufferedIncrementalDecoder
    stops: StopMatcher
    calls: ToolCallParser | None
    started: float


def preemption_victim(running: Sequence[tuple[S, Priority, int]], waiting: Priority) -> S | None:
    """The running sequence to preempt for a request of priority `waiting`, from (sequence, its priority,
    tokens it would recompute) triples: only a less urgent one; of those the least urgent class, then the
    one cheapest to recompute (usually the one admitted last, which has produced the least). None: nobody
    may be preempted for it."""
    candidates = [(priority, tokens, index) for index, (_, priority, tokens) in enumerate(running)
                  if priority > waiting]
    if not candidates:
        return None
    # Least urgent first; then fewest tokens to recompute; then the later one in the list.
    _, _, index = min(candidates, key=lambda c: (-c[0], c[1], -c[2]))
    return running[index][0]

