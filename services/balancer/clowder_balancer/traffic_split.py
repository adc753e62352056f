"""Traffic splits: a service's name routed to one of its revisions by weight (or the one a client pins), with
per-revision metrics, here as Prometheus series and in etcd for the controller's rollout driver.

A request picks its revision once, before a replica is picked among that revision's endpoints; its retries,
continuations and other choices (n > 1) stay on it. A session stays on one revision: its first pick is a hash
of the session id over the weights (so every balancer agrees), remembered while the revision keeps traffic.
"""

from __future__ import annotations

import asyncio
import bisect
import collections
import contextlib
import contextvars
import hashlib
import logging
import random
import time
from dataclasses import dataclass, field
from typing import AsyncGenerator, AsyncIterator, Awaitable, Callable, Sequence, TypeVar

from prometheus_client import CollectorRegistry, Counter, Histogram

from clowder.controller.v1 import resources_pb2
from clowder.runtime.v1 import runtime_pb2
from clowder_common import keys
from clowder_common.errors import ClowderError, FailedPrecondition, InvalidArgument, NotFound
from clowder_common.etcd import EtcdState, PrefixCache

from clowder_balancer.leased_report import LeasedReport
from clowder_balancer.metrics import TTFT_BUCKETS

log = logging.getLogger(__name__)

T = TypeVar("T")

# Request header (HTTP) / metadata key (gRPC) that pins a revision; the response carries the one that served.
REVISION_HEADER = "x-clowder-revision"
# Sessions remembered per balancer (least recently used ones go first).
MAX_SESSIONS = 10_000


@dataclass
class Served:
    """One request's revision: the pin it asked for, and the revision chosen (0: none, not a service)."""

    pin: str = ""
    revision: int = 0


# Set per request by the API faces (begin); the router's choice lands in the same object, so the face can name
# the revision in its response even when the choice was made in another task (the choices of an n > 1 request).
_SERVED: contextvars.ContextVar[Served | None] = contextvars.ContextVar("clowder_served_revision", default=None)


def begin(pin: str | None) -> Served:
    """A new request: its pinned revision (the request header's value, may be empty)."""
    served = Served((pin or "").strip())
    _SERVED.set(served)
    return served


def response_headers() -> dict[str, str]:
    """The revision that served the current request, as a header (empty when it was no service's)."""
    served = _SERVED.get()
    return {REVISION_HEADER: str(served.revision)} if served is not None and served.revision else {}


@dataclass(frozen=True)
class Target:
    service: str
    revision: int
    deployment: str


class ServiceDirectory:
    """services/ from etcd: which model names are services, and which deployments run their revisions."""

    def __init__(self, state: EtcdState) -> None:
        self._prefix = state.key(keys.SERVICES)
        self._cache = PrefixCache(state, self._prefix, resources_pb2.Service, on_change=self._changed)
        self._revision_deployments: set[str] = set()

    def _changed(self) -> None:
        self._revision_deployments = {r.deployment for s in self._cache.values() for r in s.revisions}

    async def start(self) -> None:
        await self._cache.start()

    async def stop(self) -> None:
        await self._cache.stop()

    def get(self, name: str) -> resources_pb2.Service | None:
        return self._cache.items.get(self._prefix + name)

    def has(self, name: str) -> bool:
        return self._prefix + name in self._cache.items

    def runs_revision(self, deployment: str) -> bool:
        """The deployment runs a revision of some service (its model name is the service's)."""
        return deployment in self._revision_deployments

    def listed(self) -> list[tuple[str, int, list[str]]]:
        """(name, creation time, deployments taking traffic) of every service."""
        out = []
        for service in self._cache.values():
            created = service.create_time.seconds if service.HasField("create_time") else 0
            out.append((service.name, created, [t.deployment for t in targets(service)]))
        return out

    def stable_deployment(self, name: str) -> str:
        service = self.get(name)
        if service is None:
            return ""
        stable = _revision(service, service.rollout.stable_revision)
        return stable.deployment if stable is not None else ""


def _revision(service: resources_pb2.Service, number: int) -> resources_pb2.Revision | None:
    return next((r for r in service.revisions if r.number == number), None)


@dataclass(frozen=True)
class Weighted:
    deployment: str
    revision: int
    percent: int


def targets(service: resources_pb2.Service) -> list[Weighted]:
    """Revisions that take traffic now, with their share (the stable one alone when the record names none)."""
    out = []
    for t in service.traffic:
        revision = _revision(service, t.revision)
        if t.percent > 0 and revision is not None:
            out.append(Weighted(revision.deployment, t.revision, t.percent))
    if not out:
        stable = _revision(service, service.rollout.stable_revision)
        if stable is not None:
            out.append(Weighted(stable.deployment, stable.number, 100))
    return out


def pick(options: Sequence[Weighted], point: float) -> Weighted:
    """The option whose share of [0, 1) holds `point`."""
    total = sum(o.percent for o in options)
    edges = []
    running = 0
    for option in options:
        running += option.percent
        edges.append(running / total)
    return options[min(bisect.bisect_right(edges, point), len(options) - 1)]


def session_point(service: str, session: str) -> float:
    """Where a session falls in [0, 1): the same on every balancer."""
    digest = hashlib.sha256(f"{service}\0{session}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


@dataclass
class _Counts:
    requests: int = 0
    errors: int = 0
    ttft_count: int = 0
    ttft_buckets: list[int] = field(default_factory=lambda: [0] * len(TTFT_BUCKETS))


class TrafficSplit:
    """Chooses a service request's revision and counts what each revision did."""

    def __init__(self, services: ServiceDirectory, has_endpoints: Callable[[str], bool],
                 registry: CollectorRegistry, rng: random.Random | None = None) -> None:
        self._services = services
        self._has_endpoints = has_endpoints
        self._rng = rng or random.Random()
        self._sessions: collections.OrderedDict[tuple[str, str], int] = collections.OrderedDict()
        self._counts: dict[tuple[str, int], _Counts] = {}
        self._requests = Counter(
            "clowder_balancer_revision_requests",
            "Requests for a service by the revision chosen for them and outcome (ok, error: failed after the"
            " revision was chosen, cancelled: the client left first).",
            ["model", "revision", "outcome"], registry=registry)
        self._ttft = Histogram(
            "clowder_balancer_revision_time_to_first_token_seconds",
            "From choosing a revision to the first message of its runtime, by revision.",
            ["model", "revision"], buckets=TTFT_BUCKETS, registry=registry)

    def choose(self, model: str, session: str = "") -> Target | None:
        """The revision (and its deployment) to route a request for `model` to; None when `model` is no service.

        Raises InvalidArgument for a pin that is not a number, NotFound for a revision the service does not
        have, FailedPrecondition for one that does not run now.
        """
        service = self._services.get(model)
        if service is None:
            return None
        # Outside a request an API face began (a background job), the choice is this call's alone: a holder kept in
        # that task's context would tie every later request of the task to the first one's revision.
        served = _SERVED.get() or Served()
        if served.revision:
            # Another choice of the same request (n > 1): the first one's revision.
            revision = _revision(service, served.revision)
            if revision is not None:
                return Target(model, revision.number, revision.deployment)
        if served.pin:
            target = self._pinned(service, served.pin)
        else:
            target = self._weighted(service, session)
        served.revision = target.revision
        return target

    def _pinned(self, service: resources_pb2.Service, pin: str) -> Target:
        try:
            number = int(pin.removeprefix("r"))
        except ValueError:
            raise InvalidArgument(f"{REVISION_HEADER} must be a revision number, got {pin[:32]!r}",
                                  field=REVISION_HEADER) from None
        revision = _revision(service, number)
        if revision is None:
            raise NotFound(f"service '{service.name}' has no revision {number}", reason="REVISION_NOT_FOUND",
                           metadata={"model": service.name, "revision": str(number)})
        running = {service.rollout.stable_revision, service.rollout.candidate_revision} | {
            t.revision for t in service.traffic if t.percent > 0}
        if number not in running:
            raise FailedPrecondition(f"revision {number} of service '{service.name}' is not running",
                                     reason="REVISION_NOT_RUNNING",
                                     metadata={"model": service.name, "revision": str(number)})
        return Target(service.name, number, revision.deployment)

    def _weighted(self, service: resources_pb2.Service, session: str) -> Target:
        options = targets(service)
        if not options:
            raise FailedPrecondition(f"service '{service.name}' has no revision to serve", reason="NO_REVISION")
        chosen = None
        key = (service.name, session)
        if session:
            remembered = self._sessions.get(key)
            chosen = next((o for o in options if o.revision == remembered), None)
            if chosen is None:
                chosen = pick(options, session_point(service.name, session))
        else:
            chosen = pick(options, self._rng.random())
        if not self._has_endpoints(chosen.deployment):
            # Not ready yet, or gone: the share goes to the revisions that can serve it (a canary that never
            # started must not fail the stable revision's share). A session is not moved for good by it.
            ready = [o for o in options if self._has_endpoints(o.deployment)]
            if ready:
                instead = pick(ready, self._rng.random())
                return Target(service.name, instead.revision, instead.deployment)
        if session:
            self._sessions[key] = chosen.revision
            self._sessions.move_to_end(key)
            while len(self._sessions) > MAX_SESSIONS:
                self._sessions.popitem(last=False)
        return Target(service.name, chosen.revision, chosen.deployment)

    # -- what each revision did --------------------------------------------------------------------------

    def _record(self, target: Target, outcome: str, ttft: float | None) -> None:
        label = str(target.revision)
        self._requests.labels(target.service, label, outcome).inc()
        counts = self._counts.setdefault((target.service, target.revision), _Counts())
        if outcome == "cancelled":
            return
        counts.requests += 1
        if outcome == "error":
            counts.errors += 1
        if ttft is not None:
            self._ttft.labels(target.service, label).observe(ttft)
            counts.ttft_count += 1
            for i, bound in enumerate(TTFT_BUCKETS):
                if ttft <= bound:
                    counts.ttft_buckets[i] += 1

    async def observe(self, target: Target, stream: AsyncIterator[T]) -> AsyncGenerator[T, None]:
        """Relay `stream` (a request's messages), counting its outcome and time to first message for the
        revision. A consumer that stops after the last message does not make it a cancellation."""
        started = time.monotonic()
        ttft: float | None = None
        outcome = "cancelled"
        try:
            async with contextlib.aclosing(stream):  # type: ignore[type-var]
                async for item in stream:
                    if ttft is None:
                        ttft = time.monotonic() - started
                    message = item[1] if isinstance(item, tuple) else item
                    if getattr(message, "finish_reason", runtime_pb2.FINISH_REASON_UNSPECIFIED):
                        outcome = "ok"
                    yield item
            outcome = "ok"
        except ClowderError:
            # Any failure once the revision was chosen counts, a 4xx too: the request passed the balancer's own
            # checks, and a revision that rejects what the stable one serves (a smaller context, say) is broken.
            outcome = "error"
            raise
        except (asyncio.CancelledError, GeneratorExit):
            raise
        except Exception:
            outcome = "error"
            raise
        finally:
            self._record(target, outcome, ttft)

    async def observe_call(self, target: Target, call: Awaitable[T]) -> T:
        """A unary call (embeddings) counted for the revision."""
        outcome = "cancelled"
        try:
            result = await call
            outcome = "ok"
            return result
        except ClowderError:
            outcome = "error"
            raise
        except asyncio.CancelledError:
            raise
        except Exception:
            outcome = "error"
            raise
        finally:
            self._record(target, outcome, None)

    def report(self, balancer: str) -> resources_pb2.RevisionTrafficReport:
        out = resources_pb2.RevisionTrafficReport(balancer=balancer)
        out.report_time.GetCurrentTime()
        for (service, revision), counts in sorted(self._counts.items()):
            entry = out.revisions.add(service=service, revision=revision, requests=counts.requests,
                                      errors=counts.errors, ttft_count=counts.ttft_count)
            entry.ttft_bounds.extend(TTFT_BUCKETS)
            entry.ttft_buckets.extend(counts.ttft_buckets)
        return out

    @property
    def counting(self) -> bool:
        return bool(self._counts)


class RevisionReporter(LeasedReport):
    """Writes the split's counters to revstats/<balancer> every `interval_s` on a lease (a dead balancer's
    counters disappear with it; the controller treats counters that went down as a fresh start)."""

    def __init__(self, state: EtcdState, split: TrafficSplit, balancer: str, interval_s: float = 1.0,
                 lease_ttl_s: int = 5) -> None:
        # Nothing to say until a service's request came by: no write a second for clusters without services.
        super().__init__(state, state.key(keys.revstats(balancer)), lambda: split.report(balancer),
                         "revision report", interval_s=interval_s, lease_ttl_s=lease_ttl_s,
                         due=lambda: split.counting)
