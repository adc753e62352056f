"""Rate limits per API key: requests and tokens (prompt + completion) per minute, over a sliding window."""

from __future__ import annotations

import collections
import time
from typing import Any, Callable, Mapping

from clowder.runtime.v1 import runtime_pb2
from clowder_common.errors import ResourceExhausted

from clowder_balancer.middleware.base import BaseStage, RequestContext, bad_option, number

WINDOW_S = 60.0
# Distinct callers tracked; the least recently seen are forgotten first (keys come and go).
MAX_CALLERS = 100_000


class _Window:
    def __init__(self) -> None:
        self.requests: collections.deque[float] = collections.deque()
        self.tokens: collections.deque[tuple[float, int]] = collections.deque()
        self.token_sum = 0

    def expire(self, now: float) -> None:
        while self.requests and self.requests[0] <= now - WINDOW_S:
            self.requests.popleft()
        while self.tokens and self.tokens[0][0] <= now - WINDOW_S:
            self.token_sum -= self.tokens.popleft()[1]


class RateLimitStage(BaseStage):
    """Options: requests_per_minute, tokens_per_minute (either may be absent). Tokens are known only once a
    request finishes, so a caller over its token budget is refused from its next request on."""

    name = "rate-limit"

    def __init__(self, options: Mapping[str, Any], clock: Callable[[], float] = time.monotonic) -> None:
        self.rpm = number(options, "requests_per_minute", self.name, None, 1)
        self.tpm = number(options, "tokens_per_minute", self.name, None, 1)
        if self.rpm is None and self.tpm is None:
            raise bad_option(self.name, "set requests_per_minute and/or tokens_per_minute")
        self._clock = clock
        self._windows: collections.OrderedDict[str, _Window] = collections.OrderedDict()

    def _window(self, caller: str) -> _Window:
        window = self._windows.get(caller)
        if window is None:
            window = self._windows[caller] = _Window()
            while len(self._windows) > MAX_CALLERS:
                self._windows.popitem(last=False)
        self._windows.move_to_end(caller)
        return window

    @staticmethod
    def _caller(ctx: RequestContext) -> str:
        return ctx.principal.key_id or "anonymous"

    async def before(self, ctx: RequestContext, request: runtime_pb2.GenerateRequest) -> None:
        self._admit(ctx)

    async def before_embed(self, ctx: RequestContext, request: runtime_pb2.EmbedRequest) -> None:
        # Embedding tokens count against the same budget: they cost the replica a prompt evaluation each.
        self._admit(ctx)

    def _admit(self, ctx: RequestContext) -> None:
        now = self._clock()
        window = self._window(self._caller(ctx))
        window.expire(now)
        if self.rpm is not None and len(window.requests) >= self.rpm:
            raise ResourceExhausted(
                f"rate limit of {self.rpm:g} requests per minute reached", reason="RATE_LIMIT_REQUESTS",
                retry_after=max(1.0, window.requests[0] + WINDOW_S - now),
            )
        if self.tpm is not None and window.token_sum >= self.tpm:
            raise ResourceExhausted(
                f"rate limit of {self.tpm:g} tokens per minute reached", reason="RATE_LIMIT_TOKENS",
                retry_after=max(1.0, window.tokens[0][0] + WINDOW_S - now),
            )
        window.requests.append(now)

    def after(self, ctx: RequestContext) -> None:
        used = ctx.prompt_tokens + ctx.completion_tokens
        if used and self.tpm is not None:
            window = self._window(self._caller(ctx))
            window.tokens.append((self._clock(), used))
            window.token_sum += used
