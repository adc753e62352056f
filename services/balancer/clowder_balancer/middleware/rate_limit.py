"""Rate limits per caller of one model: requests and tokens (prompt + completion) per minute, counted across
all balancers together in etcd (the same records and tolerance as a key's own limits: tenancy/quota.py)."""

from __future__ import annotations

import time
from typing import Any, Callable, Mapping

from clowder.runtime.v1 import runtime_pb2
from clowder_common.errors import ResourceExhausted

from clowder_balancer.apikeys import Limits
from clowder_balancer.middleware.base import BaseStage, RequestContext, bad_option, number
from clowder_balancer.tenancy.quota import QuotaLimiter, Reservation


class RateLimitStage(BaseStage):
    """Options: requests_per_minute, tokens_per_minute (either may be absent). Tokens are known only once a
    request finishes, so a caller over its token limit is refused from its next request on.

    Counted in etcd under quota/stage/<model>/<caller> when the balancer gives a limiter; without one (unit
    tests) in this process only. When etcd does not answer, the limiter counts locally (see quota.py)."""

    name = "rate-limit"

    def __init__(self, options: Mapping[str, Any], limiter: QuotaLimiter | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        rpm = number(options, "requests_per_minute", self.name, None, 1)
        tpm = number(options, "tokens_per_minute", self.name, None, 1)
        if rpm is None and tpm is None:
            raise bad_option(self.name, "set requests_per_minute and/or tokens_per_minute")
        self.rpm, self.tpm = rpm, tpm
        self._limits = Limits(rpm=int(rpm or 0), tpm=int(tpm or 0))
        self._limiter = limiter or QuotaLimiter(None, clock=clock)
        # Reservations of requests under way, until after() settles them (keyed by their context).
        self._held: dict[int, Reservation] = {}

    @staticmethod
    def _record(ctx: RequestContext) -> str:
        return f"stage/{ctx.model}/{ctx.principal.key_id or 'anonymous'}"

    async def before(self, ctx: RequestContext, request: runtime_pb2.GenerateRequest) -> None:
        await self._admit(ctx)

    async def before_embed(self, ctx: RequestContext, request: runtime_pb2.EmbedRequest) -> None:
        # Embedding tokens count against the same budget: they cost the replica a prompt evaluation each.
        await self._admit(ctx)

    async def _admit(self, ctx: RequestContext) -> None:
        try:
            # Nothing reserved for tokens: they count once known (the stage's documented behaviour).
            self._held[id(ctx)] = await self._limiter.reserve(self._record(ctx), self._limits, 0, 0)
        except ResourceExhausted as err:
            raise ResourceExhausted(err.message.replace("this API key", "this caller of the model"),
                                    reason=err.reason, retry_after=err.retry_after) from None

    def after(self, ctx: RequestContext) -> None:
        reservation = self._held.pop(id(ctx), None)
        used = ctx.prompt_tokens + ctx.completion_tokens
        if reservation is None or not used or self.tpm is None:
            return
        self._limiter.settle_soon(reservation, used)

    async def drain(self) -> None:
        await self._limiter.drain()
