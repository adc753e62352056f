"""What the pipeline calls per request: limits and budget (reserve, settle), the fair queue, usage metering."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from clowder.runtime.v1 import runtime_pb2

from clowder_balancer.middleware.base import RequestContext
from clowder_balancer.tenancy.fairness import FairQueue
from clowder_balancer.tenancy.quota import QuotaLimiter, Reservation
from clowder_balancer.tenancy.usage import ANONYMOUS, UsageMeter

log = logging.getLogger(__name__)

# Characters per token when guessing a prompt's size before the runtime has tokenized it (English text
# runs about 4; the estimate is replaced by the real count when the request settles).
CHARS_PER_TOKEN = 4
# Tokens the chat template adds per message (role markers and separators), roughly.
TOKENS_PER_MESSAGE = 4


def prompt_estimate(request: runtime_pb2.GenerateRequest) -> int:
    if request.HasField("chat"):
        chars = sum(len(m.content) for m in request.chat.messages)
        return chars // CHARS_PER_TOKEN + TOKENS_PER_MESSAGE * len(request.chat.messages) + 1
    return len(request.prompt) // CHARS_PER_TOKEN + 1


@dataclass(frozen=True)
class TenancySettings:
    # Tokens a request that sets no max_tokens is expected to generate, per choice (for tokens per minute
    # and budget reservations; the real count replaces it when the request ends).
    completion_estimate_tokens: int = 256


class Ticket:
    """One admitted request: its reservation, its queue slot, and the usage its client has been sent."""

    def __init__(self, tenancy: "Tenancy", ctx: RequestContext, reservation: Reservation | None,
                 slot: str | None, guessed_prompt: int = 0) -> None:
        self._tenancy = tenancy
        self._ctx = ctx
        self._guessed_prompt = guessed_prompt
        self._reservation = reservation
        self._slot = slot
        # Per choice, the usage of the last message relayed (counts are cumulative over a stream).
        self._usage: dict[int, runtime_pb2.Usage] = {}
        self._closed = False

    def sent(self, index: int, message: runtime_pb2.GenerateResponse) -> None:
        if message.HasField("usage"):
            self._usage[index] = message.usage

    def embedded(self, prompt_tokens: int) -> None:
        self._usage[0] = runtime_pb2.Usage(prompt_tokens=prompt_tokens)

    def close(self) -> None:
        """The request is over (any outcome): free the slot, count usage, settle the reservation. Never blocks."""
        if self._closed:
            return
        self._closed = True
        if self._slot is not None:
            self._tenancy.queue.release(self._slot, self._ctx.principal.key_id or ANONYMOUS)
        first = self._usage[min(self._usage)] if self._usage else runtime_pb2.Usage()
        completion = sum(u.completion_tokens for u in self._usage.values())
        principal = self._ctx.principal
        if self._usage and self._guessed_prompt and first.prompt_tokens:
            self._tenancy.learn_overhead(self._ctx.model, first.prompt_tokens - self._guessed_prompt)
        if self._usage:
            # n choices of one prompt: the prompt counts once (what the client's usage field says).
            self._tenancy.meter.record(principal.key_id, principal.groups, self._ctx.model, first.prompt_tokens,
                                       first.cached_prompt_tokens, completion)
        if self._reservation is not None:
            self._tenancy.settle_later(self._reservation, first.prompt_tokens + completion)


class Tenancy:
    def __init__(self, limiter: QuotaLimiter, meter: UsageMeter, queue: FairQueue,
                 settings: TenancySettings = TenancySettings()) -> None:
        self.limiter = limiter
        self.meter = meter
        self.queue = queue
        self._settings = settings
        self._settling: set[asyncio.Task] = set()
        # Per model, how many tokens the real prompts had beyond chars/4 (the chat template's markers and
        # default system prompt): learned from settled requests, so reservations come close to the real size.
        self._overhead: dict[str, float] = {}

    def learn_overhead(self, model: str, missed: int) -> None:
        # Up at once, down slowly: an estimate that runs short is what lets a budget be overshot.
        self._overhead[model] = max(float(missed), 0.9 * self._overhead.get(model, 0.0), 0.0)

    async def admit(self, ctx: RequestContext, request: runtime_pb2.GenerateRequest, n: int = 1) -> Ticket:
        """Reserve the caller's limits (ResourceExhausted when over one), cap max_tokens to its budget, then
        wait for a slot of the model (bounded). The ticket must be closed when the request ends."""
        principal = ctx.principal
        reservation = None
        limits = principal.limits
        guessed = 0
        if limits.any:
            guessed = prompt_estimate(request)
            prompt = guessed + round(self._overhead.get(ctx.model, 0.0))
            per_choice = request.sampling.max_tokens or self._settings.completion_estimate_tokens
            reservation = await self.limiter.reserve(principal.key_id, limits, prompt + per_choice * n, prompt)
            if reservation.max_completion is not None:
                allowed = max(1, reservation.max_completion // n)
                if not request.sampling.max_tokens or request.sampling.max_tokens > allowed:
                    # The budget's remainder, not a 429 later: the answer is cut short (finish_reason length).
                    request.sampling.max_tokens = allowed
        try:
            await self.queue.acquire(ctx.model, principal.key_id or ANONYMOUS, limits.priority)
        except BaseException:
            if reservation is not None:
                self.settle_later(reservation, 0)
            raise
        return Ticket(self, ctx, reservation, ctx.model, guessed)

    async def admit_embed(self, ctx: RequestContext, request: runtime_pb2.EmbedRequest) -> Ticket:
        """Embeddings count against the same limits and usage; they are short, so they skip the queue."""
        reservation = None
        if ctx.principal.limits.any:
            prompt = sum(len(text) for text in request.inputs) // CHARS_PER_TOKEN + len(request.inputs)
            reservation = await self.limiter.reserve(ctx.principal.key_id, ctx.principal.limits, prompt, prompt)
        return Ticket(self, ctx, reservation, None)

    def settle_later(self, reservation: Reservation, used: int) -> None:
        task = asyncio.create_task(self._settle(reservation, used), name="quota-settle")
        self._settling.add(task)
        task.add_done_callback(self._settling.discard)

    async def _settle(self, reservation: Reservation, used: int) -> None:
        try:
            await self.limiter.settle(reservation, used)
        except Exception:  # a lost settlement costs accuracy, never a request
            log.exception("quota: settling key %s failed", reservation.key_id)

    async def start(self) -> None:
        await self.meter.start()

    async def stop(self) -> None:
        """Finish settlements, then flush usage (the caller stops serving first)."""
        if self._settling:
            await asyncio.wait(list(self._settling), timeout=5.0)
        await self.meter.stop()
