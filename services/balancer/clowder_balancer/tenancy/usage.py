"""Usage metering: tokens the clients were sent, per key, model and day, summed per balancer, flushed to etcd."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import functools
import logging
import re
import time
from typing import Callable

from prometheus_client import CollectorRegistry, Counter

from clowder.balancer.v1 import apikeys_pb2
from clowder_common.errors import InvalidArgument, Unavailable
from clowder_common.etcd import EtcdState
from clowder_common.tasks import cancel_and_wait

from clowder_balancer.tenancy.cas import swap

log = logging.getLogger(__name__)

USAGE = "usage"
# Key name of requests without an API key.
ANONYMOUS = "_anonymous"
# (day, key, model) sums kept while etcd does not answer; beyond this the oldest are dropped (and logged).
MAX_PENDING = 100_000
_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")


@dataclasses.dataclass
class _Sums:
    groups: set[str] = dataclasses.field(default_factory=set)
    requests: int = 0
    prompt: int = 0
    cached: int = 0
    completion: int = 0


def today(now: float) -> str:
    return datetime.datetime.fromtimestamp(now, datetime.timezone.utc).strftime("%Y-%m-%d")


class UsageMeter:
    """Counts requests as they end; flushes to etcd in the background; answers GetUsage from etcd.

    Usage metering: tokens the clients were sent, per key, model and day, summed per balancer and flushed to etcd.
    Each balancer adds up its requests in memory and every usage_flush_interval_s adds the sums to
    usage/<YYYY-MM-DD>/<key>/<model> by compare-and-swap (so any number of balancers write the same records).
    A balancer that is killed loses at most what it counted since its last flush (one interval); a flush that
    fails (etcd down) keeps the sums and retries at the next interval, up to MAX_PENDING records.
    """

    def __init__(self, state: EtcdState, registry: CollectorRegistry, flush_interval_s: float = 2.0,
                 etcd_timeout_s: float = 2.0, clock: Callable[[], float] = time.time) -> None:
        self._state = state
        self._interval = flush_interval_s
        self._timeout = etcd_timeout_s
        self._clock = clock
        self._pending: dict[tuple[str, str, str], _Sums] = {}
        self._task: asyncio.Task | None = None
        self._lock = asyncio.Lock()
        self._tokens = Counter(
            "clowder_balancer_usage_tokens",
            "Tokens sent to clients, by API key, model and kind (prompt, cached_prompt, completion).",
            ["key", "model", "kind"], registry=registry)
        self._requests = Counter(
            "clowder_balancer_usage_requests", "Requests counted for usage, by API key and model.",
            ["key", "model"], registry=registry)

    def record(self, key_id: str, groups: frozenset[str], model: str, prompt: int, cached: int,
               completion: int) -> None:
        key = key_id or ANONYMOUS
        entry = (today(self._clock()), key, model)
        sums = self._pending.get(entry)
        if sums is None:
            if len(self._pending) >= MAX_PENDING:
                dropped = next(iter(self._pending))
                log.error("usage: %d records waiting for etcd; dropping %s", MAX_PENDING, dropped)
                self._pending.pop(dropped)
            sums = self._pending[entry] = _Sums()
        sums.groups |= groups
        sums.requests += 1
        sums.prompt += prompt
        sums.cached += cached
        sums.completion += completion
        self._requests.labels(key, model).inc()
        self._tokens.labels(key, model, "prompt").inc(prompt)
        self._tokens.labels(key, model, "cached_prompt").inc(cached)
        self._tokens.labels(key, model, "completion").inc(completion)

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="usage-flush")

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None
        # What the last interval counted: a clean shutdown loses nothing while etcd answers.
        try:
            await asyncio.wait_for(self.flush(), timeout=max(3.0, self._timeout))
        except (asyncio.TimeoutError, Unavailable) as exc:
            log.warning("usage: %d records not flushed at shutdown: %s", len(self._pending), exc)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            try:
                await self.flush()
            except Unavailable as exc:
                log.warning("usage: flush failed, %d records kept for the next one: %s", len(self._pending), exc)
            except Exception:  # never let one bad flush end flushing
                log.exception("usage: flush failed")

    async def flush(self) -> None:
        async with self._lock:
            batch, self._pending = self._pending, {}
            try:
                for entry in list(batch):
                    sums = batch[entry]
                    await swap(self._state, self._state.key(USAGE, *entry), apikeys_pb2.UsageRecord,
                               functools.partial(_add, entry=entry, sums=sums), self._timeout)
                    del batch[entry]
            finally:
                # Unflushed sums go back, merged with what arrived meanwhile.
                for entry, sums in batch.items():
                    into = self._pending.setdefault(entry, _Sums())
                    into.groups |= sums.groups
                    into.requests += sums.requests
                    into.prompt += sums.prompt
                    into.cached += sums.cached
                    into.completion += sums.completion

    async def query(self, request: apikeys_pb2.GetUsageRequest) -> apikeys_pb2.GetUsageResponse:
        for name in ("start_date", "end_date"):
            value = getattr(request, name)
            if value and not _DATE.match(value):
                raise InvalidArgument(f"{name} must be YYYY-MM-DD", field=name)
        start, end = request.start_date, request.end_date or today(self._clock())
        items, _ = await self._state.list(self._state.key(USAGE, ""), apikeys_pb2.UsageRecord)
        response = apikeys_pb2.GetUsageResponse()
        for item in items:
            record = item.value
            if (start and record.date < start) or record.date > end:
                continue
            if request.key and record.key != request.key:
                continue
            if request.model and record.model != request.model:
                continue
            if request.group and request.group not in record.groups:
                continue
            response.records.append(record)
            response.requests += record.requests
            response.prompt_tokens += record.prompt_tokens
            response.cached_prompt_tokens += record.cached_prompt_tokens
            response.completion_tokens += record.completion_tokens
        return response


def _add(record: apikeys_pb2.UsageRecord, entry: tuple[str, str, str], sums: _Sums) -> None:
    record.date, record.key, record.model = entry
    groups = sorted(set(record.groups) | sums.groups)
    del record.groups[:]
    record.groups.extend(groups)
    record.requests += sums.requests
    record.prompt_tokens += sums.prompt
    record.cached_prompt_tokens += sums.cached
    record.completion_tokens += sums.completion
