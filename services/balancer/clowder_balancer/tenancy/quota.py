"""Cluster-wide limits of keys, groups and rate-limit stages: requests and tokens per minute, token budgets."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import logging
import time
from typing import Callable

from clowder.balancer.v1 import apikeys_pb2
from clowder_common.errors import ResourceExhausted, Unavailable
from clowder_common.etcd import EtcdState

from clowder_balancer.apikeys import Limits
from clowder_balancer.tenancy.cas import swap

log = logging.getLogger(__name__)

QUOTA = "quota"
WINDOW_S = 60.0
# Up to this many requests per minute, each admission's time is kept: no more than the limit in any minute.
# Above it, a bucket of the limit refilled over the minute (GCRA): one number instead of a long list.
MAX_LOGGED_RPM = 1000
# Distinct keys counted locally during an etcd outage (least recently used forgotten first).
MAX_LOCAL = 100_000


def budget_period(limits: Limits, now: float) -> str:
    day = datetime.datetime.fromtimestamp(now, datetime.timezone.utc)
    return day.strftime("%Y-%m" if limits.budget_period == apikeys_pb2.BUDGET_PERIOD_MONTH else "%Y-%m-%d")


def _period_end(limits: Limits, now: float) -> float:
    day = datetime.datetime.fromtimestamp(now, datetime.timezone.utc).replace(hour=0, minute=0, second=0,
                                                                             microsecond=0)
    if limits.budget_period == apikeys_pb2.BUDGET_PERIOD_MONTH:
        day = day.replace(day=1)
        end = (day + datetime.timedelta(days=32)).replace(day=1)
    else:
        end = day + datetime.timedelta(days=1)
    return end.timestamp()


@dataclasses.dataclass
class Reservation:
    """What one admitted request holds until it settles."""

    key_id: str
    limits: Limits
    estimate: int
    period: str
    # The most tokens the request may generate so the budget holds (None: no budget, leave it).
    max_completion: int | None
    # Budget tokens held in the period's reserved count.
    reserved: int
    # Counted in memory only (etcd did not answer at admission).
    local: bool


class _Refused(Exception):
    def __init__(self, error: ResourceExhausted) -> None:
        super().__init__(error.message)
        self.error = error


def admit(state: apikeys_pb2.QuotaState, limits: Limits, now: float, estimate: int, prompt_estimate: int
          ) -> tuple[int | None, int]:
    """Reserve one request of about `estimate` tokens in `state`, or raise _Refused; returns the most tokens
    the request may generate within the budget (None without a budget) and the budget tokens reserved.
    Pure: runs once per CAS round."""
    recent: list[float] | None = None
    if limits.rpm and limits.rpm <= MAX_LOGGED_RPM:
        recent = [t for t in state.request_times if t > now - WINDOW_S]
        if len(recent) >= limits.rpm:
            raise _Refused(ResourceExhausted(
                f"rate limit of {limits.rpm} requests per minute reached for this API key",
                reason="RATE_LIMIT_EXCEEDED", retry_after=max(1.0, min(recent) + WINDOW_S - now)))
    elif limits.rpm:
        interval = WINDOW_S / limits.rpm
        tat = max(state.requests_tat, now)
        # Up to rpm requests back to back, then one per interval: a sliding minute, not a fixed one.
        if tat - now > WINDOW_S - interval + 1e-6:
            raise _Refused(ResourceExhausted(
                f"rate limit of {limits.rpm} requests per minute reached for this API key",
                reason="RATE_LIMIT_EXCEEDED", retry_after=max(1.0, tat - now - (WINDOW_S - interval))))
    if limits.tpm:
        tat = max(state.tokens_tat, now)
        if tat - now >= WINDOW_S:
            raise _Refused(ResourceExhausted(
                f"rate limit of {limits.tpm} tokens per minute reached for this API key",
                reason="RATE_LIMIT_EXCEEDED", retry_after=max(1.0, tat - now - WINDOW_S + 1)))
    max_completion = None
    reserved = 0
    if limits.budget_tokens:
        period = budget_period(limits, now)
        if state.budget_period != period:
            state.budget_period, state.budget_used, state.budget_reserved = period, 0, 0
        left = limits.budget_tokens - state.budget_used - state.budget_reserved
        if left <= 0:
            raise _Refused(ResourceExhausted(
                f"the token budget of this API key ({limits.budget_tokens} per "
                f"{'month' if limits.budget_period == apikeys_pb2.BUDGET_PERIOD_MONTH else 'day'}) is used up",
                reason="INSUFFICIENT_QUOTA", retry_after=max(1.0, _period_end(limits, now) - now)))
        max_completion = max(1, left - prompt_estimate)
        reserved = min(estimate, left)
        state.budget_reserved += reserved
    if recent is not None:
        del state.request_times[:]
        state.request_times.extend([*recent, now])
    elif limits.rpm:
        state.requests_tat = max(state.requests_tat, now) + WINDOW_S / limits.rpm
    if limits.tpm:
        state.tokens_tat = max(state.tokens_tat, now) + estimate * WINDOW_S / limits.tpm
    return max_completion, reserved


def settle(state: apikeys_pb2.QuotaState, reservation: Reservation, used: int) -> None:
    """Replace the reservation's estimate by the tokens really used. Pure: runs once per CAS round."""
    limits = reservation.limits
    if limits.tpm:
        state.tokens_tat += (used - reservation.estimate) * WINDOW_S / limits.tpm
    if limits.budget_tokens:
        if state.budget_period == reservation.period:
            held = min(reservation.reserved, state.budget_reserved)
            state.budget_reserved -= held
            state.budget_used += used
        elif not state.budget_period or state.budget_period < reservation.period:
            state.budget_period, state.budget_used, state.budget_reserved = reservation.period, used, 0
        # else the request ran across a period's end: it counted in the old period, which is over.


class QuotaLimiter:
    """Admits and settles requests of keys with limits; keys without any cost nothing.

    Requests and tokens per minute, and a token budget per day or month, per holder: a key (quota/<key id>),
    a group (quota/group/<name>) or a rate-limit stage's caller (quota/stage/<model>/<caller>).
    Every balancer changes one record per holder by compare-and-swap, so admissions on all
    balancers are counted together: reserve before the call (a request, and an estimate of its tokens), settle
    after (the tokens the client was sent replace the estimate).

    Tolerance, while etcd answers:
    - requests per minute: exact (every admission is one successful swap): up to 1000 rpm no more than the limit
      in any minute (admission times are kept); above, a bucket of the limit refilled continuously (GCRA);
    - tokens per minute: a request is admitted while the key is under its limit, so the minute can end over it
      by the estimates of the requests admitted last, corrected to their real size when they settle;
    - budget: admission needs used + reserved < budget, and a request's max_tokens is cut to what the budget has
      left (less its prompt's estimate), so the budget is overshot at most by the error of the prompt estimates
      of requests running together (about chars/4 per prompt). A balancer that dies mid-request leaves its
      reservation counted until the period ends (never more than the requests it had running).
    When etcd does not answer within quota_etcd_timeout_s, each balancer counts on its own (the same algorithms
    in memory) for quota_local_fallback_s before asking etcd again: serving goes on (issue 11), and a key may
    then get up to N times its per-minute limits through N balancers; budget use counted locally is added to
    etcd's record once it answers again.
    """

    def __init__(self, state: EtcdState | None, etcd_timeout_s: float = 1.0, local_fallback_s: float = 5.0,
                 clock: Callable[[], float] = time.time) -> None:
        """Without `state`, every count is local (a single balancer, or unit tests)."""
        self._state = state
        self._timeout = etcd_timeout_s
        self._fallback_s = local_fallback_s
        self._clock = clock
        self._local: dict[str, apikeys_pb2.QuotaState] = {}
        # Budget tokens settled locally during an outage, added to etcd's record when it answers again.
        self._unsynced: dict[str, tuple[Limits, str, int]] = {}
        self._remote_after = 0.0
        self._settling: set[asyncio.Task] = set()

    def _key(self, key_id: str) -> str:
        assert self._state is not None
        return self._state.key(QUOTA, key_id)

    @property
    def local(self) -> bool:
        return self._state is None or self._clock() < self._remote_after

    def _went_local(self, what: str, exc: Exception) -> None:
        if not self.local:
            log.warning("quota: etcd did not answer (%s: %s); counting limits on this balancer alone for %gs",
                        what, exc, self._fallback_s)
        self._remote_after = self._clock() + self._fallback_s

    def _local_state(self, key_id: str) -> apikeys_pb2.QuotaState:
        found = self._local.pop(key_id, None)
        if found is None:
            found = apikeys_pb2.QuotaState()
            while len(self._local) >= MAX_LOCAL:
                self._local.pop(next(iter(self._local)))
        self._local[key_id] = found
        return found

    async def reserve(self, key_id: str, limits: Limits, estimate: int, prompt_estimate: int) -> Reservation:
        """Raise ResourceExhausted (429) when the key is over a limit or its budget."""
        now = self._clock()
        if not self.local:
            try:
                assert self._state is not None
                await self._sync(key_id)
                max_completion, reserved = await swap(
                    self._state, self._key(key_id), apikeys_pb2.QuotaState,
                    lambda s: admit(s, limits, now, estimate, prompt_estimate), self._timeout)
                return Reservation(key_id, limits, estimate, budget_period(limits, now), max_completion, reserved,
                                   False)
            except _Refused as refused:
                raise refused.error from None
            except Unavailable as exc:
                self._went_local("reserve", exc)
        try:
            max_completion, reserved = admit(self._local_state(key_id), limits, now, estimate, prompt_estimate)
        except _Refused as refused:
            raise refused.error from None
        return Reservation(key_id, limits, estimate, budget_period(limits, now), max_completion, reserved, True)

    async def settle(self, reservation: Reservation, used: int) -> None:
        if not reservation.local and not self.local:
            try:
                assert self._state is not None
                await swap(self._state, self._key(reservation.key_id), apikeys_pb2.QuotaState,
                           lambda s: settle(s, reservation, used), self._timeout)
                return
            except Unavailable as exc:
                self._went_local("settle", exc)
        self.settle_local(reservation, used)

    def settle_soon(self, reservation: Reservation, used: int) -> None:
        """Settle without holding up the caller: a local reservation at once, an etcd one in the background
        (a lost settlement costs accuracy, never a request); drain() waits for those still running."""
        if reservation.local:
            self.settle_local(reservation, used)
            return
        task = asyncio.create_task(self._settle_logged(reservation, used), name="quota-settle")
        self._settling.add(task)
        task.add_done_callback(self._settling.discard)

    async def _settle_logged(self, reservation: Reservation, used: int) -> None:
        try:
            await self.settle(reservation, used)
        except Exception:
            log.exception("quota: settling %s failed", reservation.key_id)

    async def drain(self, timeout: float = 5.0) -> None:
        if self._settling:
            await asyncio.wait(list(self._settling), timeout=timeout)

    def settle_local(self, reservation: Reservation, used: int) -> None:
        """Settle in memory only: a reservation made locally (etcd unreachable or not used)."""
        settle(self._local_state(reservation.key_id), reservation, used)
        if reservation.limits.budget_tokens:
            _, period, tokens = self._unsynced.get(reservation.key_id, (reservation.limits, reservation.period, 0))
            self._unsynced[reservation.key_id] = (reservation.limits, reservation.period,
                                                  tokens + used if period == reservation.period else used)

    async def _sync(self, key_id: str) -> None:
        """Budget use counted locally during an outage goes to etcd before the key's next admission there."""
        pending = self._unsynced.pop(key_id, None)
        if pending is None:
            return
        limits, period, tokens = pending

        def add(state: apikeys_pb2.QuotaState) -> None:
            if state.budget_period == period:
                state.budget_used += tokens
            elif not state.budget_period or state.budget_period < period:
                state.budget_period, state.budget_used, state.budget_reserved = period, tokens, 0
        try:
            assert self._state is not None
            await swap(self._state, self._key(key_id), apikeys_pb2.QuotaState, add, self._timeout)
        except Unavailable:
            self._unsynced[key_id] = pending
            raise
        self._local.pop(key_id, None)
