"""What the pipeline calls per request: limits and budget (reserve, settle), the fair queue, usage metering."""

from __future__ import annotations

from dataclasses import dataclass

from clowder.balancer.v1 import apikeys_pb2
from clowder.runtime.v1 import runtime_pb2

from clowder_balancer.apikeys import Limits, Principal
from clowder_balancer.middleware.base import RequestContext
from clowder_balancer.tenancy.fairness import FairQueue
from clowder_balancer.tenancy.groups import GroupLimitsStore
from clowder_balancer.tenancy.quota import QuotaLimiter, Reservation
from clowder_balancer.tenancy.usage import ANONYMOUS, UsageMeter


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
    """One admitted request: its reservations, its queue slot, and the usage its client has been sent."""

    def __init__(self, tenancy: "Tenancy", ctx: RequestContext, reservations: list[Reservation],
                 slot: str | None, guessed_prompt: int = 0) -> None:
        self._tenancy = tenancy
        self._ctx = ctx
        self._guessed_prompt = guessed_prompt
        self._reservations = reservations
        self._slot = slot
        # Per choice, the last message relayed that carried counts (cumulative over a stream); read at close.
        self._last: dict[int, runtime_pb2.GenerateResponse] = {}
        self._closed = False

    def sent(self, index: int, message: runtime_pb2.GenerateResponse) -> None:
        # Kept, not copied: this runs for every token, and a stream its client cuts short is counted up to the
        # message relayed last (every message carries the counts so far), not dropped for want of a final usage.
        if message.completion_tokens or message.HasField("usage"):
            self._last[index] = message

    def embedded(self, prompt_tokens: int) -> None:
        self._last[0] = runtime_pb2.GenerateResponse(usage=runtime_pb2.Usage(prompt_tokens=prompt_tokens))

    @staticmethod
    def _usage(message: runtime_pb2.GenerateResponse) -> runtime_pb2.Usage:
        if message.HasField("usage"):
            return message.usage
        return runtime_pb2.Usage(prompt_tokens=message.prompt_tokens, completion_tokens=message.completion_tokens)

    def close(self) -> None:
        """The request is over (any outcome): free the slot, count usage, settle the reservations. Never blocks."""
        if self._closed:
            return
        self._closed = True
        if self._slot is not None:
            self._tenancy.queue.release(self._slot, self._ctx.principal.key_id or ANONYMOUS)
        usage = {index: self._usage(message) for index, message in self._last.items()}
        first = usage[min(usage)] if usage else runtime_pb2.Usage()
        completion = sum(u.completion_tokens for u in usage.values())
        principal = self._ctx.principal
        if usage and self._guessed_prompt and first.prompt_tokens:
            self._tenancy.learn_overhead(self._ctx.model, first.prompt_tokens - self._guessed_prompt)
        if usage:
            # n choices of one prompt: the prompt counts once (what the client's usage field says).
            self._tenancy.meter.record(principal.key_id, principal.groups, self._ctx.model, first.prompt_tokens,
                                       first.cached_prompt_tokens, completion)
        for reservation in self._reservations:
            self._tenancy.settle_later(reservation, first.prompt_tokens + completion)


class Tenancy:
    def __init__(self, limiter: QuotaLimiter, meter: UsageMeter, queue: FairQueue, groups: GroupLimitsStore,
                 settings: TenancySettings = TenancySettings()) -> None:
        self.limiter = limiter
        self.meter = meter
        self.queue = queue
        self.groups = groups
        self._settings = settings
        # Per model, how many tokens the real prompts had beyond chars/4 (the chat template's markers and
        # default system prompt): learned from settled requests, so reservations come close to the real size.
        self._overhead: dict[str, float] = {}

    def learn_overhead(self, model: str, missed: int) -> None:
        # Up at once, down slowly: an estimate that runs short is what lets a budget be overshot.
        self._overhead[model] = max(float(missed), 0.9 * self._overhead.get(model, 0.0), 0.0)

    def _holders(self, principal: Principal) -> list[tuple[str, Limits]]:
        """Whose limits a request of `principal` counts against: its groups' (quota/group/<name>) and its own."""
        holders = [(f"group/{group}", self.groups.limits(group)) for group in sorted(principal.groups)]
        holders = [(name, limits) for name, limits in holders if limits.any]
        if principal.limits.any:
            holders.append((principal.key_id, principal.limits))
        return holders

    def priority(self, principal: Principal) -> int:
        """The key's own class, else the most favoured of its groups' classes, else standard."""
        if principal.limits.priority:
            return principal.limits.priority
        classes = [self.groups.limits(g).priority for g in principal.groups]
        return min((c for c in classes if c), default=apikeys_pb2.PRIORITY_CLASS_STANDARD)

    async def _reserve(self, holders: list[tuple[str, Limits]], estimate: int, prompt: int) -> list[Reservation]:
        reservations: list[Reservation] = []
        try:
            for name, limits in holders:
                reservations.append(await self.limiter.reserve(name, limits, estimate, prompt))
        except BaseException:
            # Refused by one: what the others reserved goes back (their request counts stay: documented).
            for reservation in reservations:
                self.settle_later(reservation, 0)
            raise
        return reservations

    async def admit(self, ctx: RequestContext, request: runtime_pb2.GenerateRequest, n: int = 1) -> Ticket:
        """Reserve the caller's limits and its groups' (ResourceExhausted when over one), cap max_tokens to the
        budgets left, then wait for a slot of the model (bounded). The ticket must be closed when the request
        ends."""
        principal = ctx.principal
        reservations: list[Reservation] = []
        holders = self._holders(principal)
        guessed = 0
        if holders:
            guessed = prompt_estimate(request)
            prompt = guessed + round(self._overhead.get(ctx.model, 0.0))
            per_choice = request.sampling.max_tokens or self._settings.completion_estimate_tokens
            reservations = await self._reserve(holders, prompt + per_choice * n, prompt)
            caps = [r.max_completion for r in reservations if r.max_completion is not None]
            if caps:
                allowed = max(1, min(caps) // n)
                if not request.sampling.max_tokens or request.sampling.max_tokens > allowed:
                    # The budget's remainder, not a 429 later: the answer is cut short (finish_reason length).
                    request.sampling.max_tokens = allowed
        if request.priority == runtime_pb2.PRIORITY_BATCH:
            # Batch work takes no slot of the queue: the batch worker sends it only into free slots
            # (batch/capacity.py) and a replica preempts it for an interactive request, so interactive
            # requests must not wait here behind it.
            return Ticket(self, ctx, reservations, None, guessed)
        try:
            await self.queue.acquire(ctx.model, principal.key_id or ANONYMOUS, self.priority(principal))
        except BaseException:
            for reservation in reservations:
                self.settle_later(reservation, 0)
            raise
        return Ticket(self, ctx, reservations, ctx.model, guessed)

    async def admit_embed(self, ctx: RequestContext, request: runtime_pb2.EmbedRequest) -> Ticket:
        """Embeddings count against the same limits and usage; they are short, so they skip the queue."""
        reservations: list[Reservation] = []
        holders = self._holders(ctx.principal)
        if holders:
            prompt = sum(len(text) for text in request.inputs) // CHARS_PER_TOKEN + len(request.inputs)
            reservations = await self._reserve(holders, prompt, prompt)
        return Ticket(self, ctx, reservations, None)

    def settle_later(self, reservation: Reservation, used: int) -> None:
        self.limiter.settle_soon(reservation, used)

    # -- ApiKeyService's tenant calls (apikeys.TenantAdmin) --------------------------------------------

    async def usage(self, request: apikeys_pb2.GetUsageRequest) -> apikeys_pb2.GetUsageResponse:
        return await self.meter.query(request)

    async def set_group_limits(self, group: str, limits: apikeys_pb2.KeyLimits) -> apikeys_pb2.GroupLimits:
        return await self.groups.set(group, limits)

    async def list_group_limits(self) -> list[apikeys_pb2.GroupLimits]:
        return await self.groups.list()

    async def start(self) -> None:
        await self.groups.start()
        await self.meter.start()

    async def stop(self) -> None:
        """Finish settlements, then flush usage (the caller stops serving first)."""
        await self.limiter.drain()
        await self.meter.stop()
        await self.groups.stop()
