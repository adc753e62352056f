"""The routing core both API faces share: find the model's replicas, pick one, relay its stream, fail over."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import AsyncGenerator, Callable, Iterator, Sequence

import grpc
from opentelemetry import propagate, trace

from clowder.runtime.v1 import runtime_pb2
from clowder_common.errors import (
    ClowderError, DeadlineExceeded, FieldViolation, Internal, Unavailable, from_rpc_error,
)

from clowder_balancer import logcontext
from clowder_balancer.channels import ChannelPool
from clowder_balancer.config import BalancerConfig
from clowder_balancer.continuation import Progress, resolved_max_tokens
from clowder_balancer.discovery import Discovery, ReadyEndpoint
from clowder_balancer.metrics import Metrics, ModelMetrics, ReplicaMetrics
from clowder_balancer.load import LoadTracker
from clowder_balancer.outliers import OutlierDetector
from clowder_balancer.routing.base import Candidate, RouteRequest, RoutingEnv
from clowder_balancer.routing.prefix_index import block_hashes, render_chat
from clowder_balancer.routing.profiles import EMBEDDINGS_PROFILE, schedulers_for
from clowder_balancer.routing.registry import RoutingPlugins
from clowder_balancer.routing.scheduler import Scheduler
from clowder_balancer.stats import RuntimeStats, StatsPoller
from clowder_balancer.traffic_split import TrafficSplit

log = logging.getLogger(__name__)

REQUEST_ID_KEY = "x-request-id"
# Inputs per runtime Embed call (the runtime's own limit).
EMBED_BATCH = 256
# How long a request for an adapter no ready replica lists yet waits for one to (a load reaches balancers
# through an etcd watch, moments after the controller reports it loaded).
ADAPTER_WAIT_S = 2.0

# Failures before the first message that another replica may not have. Nothing has reached the client
# yet and generation has no side effects, so trying elsewhere is safe.
RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED})
# Failures after the first message that say the replica (or the way to it) broke, not the request: the
# generation continues on another replica. DEADLINE_EXCEEDED is the request's own deadline; INVALID_ARGUMENT
# and the like would fail anywhere.
CONTINUABLE = frozenset({
    grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.DATA_LOSS,
    grpc.StatusCode.CANCELLED, grpc.StatusCode.RESOURCE_EXHAUSTED,
})


@dataclass
class _Tries:
    """One request's tries so far: the replicas tried, and why the last one failed."""

    request_id: str
    # Until when a try waits for a ready replica.
    ready_deadline: float
    # Tries allowed so far: max_attempts, and as many again after each continuation.
    budget: int = 1
    tried: set[str] = field(default_factory=set)
    last_error: ClowderError | None = None
    # The next try continues a broken stream: not a retry before the first token.
    continuing: bool = False


class _Retry(Exception):
    """An attempt failed before its first message; the next replica may try."""

    def __init__(self, error: ClowderError) -> None:
        super().__init__(error.message)
        self.error = error


class _Broken(Exception):
    """An attempt failed after its first message in a way another replica may not: the stream may continue."""

    def __init__(self, error: ClowderError, why: str) -> None:
        super().__init__(error.message)
        self.error = error
        self.why = why


class _Sent:
    """One try of a request on one replica, as its routing profile's plugins hear of it."""

    def __init__(self, scheduler: Scheduler, route: RouteRequest, choice: Candidate) -> None:
        self.choice = choice
        self._scheduler = scheduler
        self._route = route
        self._prefilling = True
        scheduler.routed(route, choice)

    def prefilled(self) -> None:
        """The first message came (or the try ended without one): its prompt is no longer ahead of others."""
        if self._prefilling:
            self._prefilling = False
            self._scheduler.prefilled(self._route, self.choice)

    def finished(self, blocks: tuple[int, ...]) -> None:
        self._scheduler.finished(self._route, self.choice, blocks)


class Router:
    """Streams GenerateResponse messages of one request from the replica its routing profile picks."""

    def __init__(
        self,
        config: BalancerConfig,
        discovery: Discovery,
        channels: ChannelPool,
        metrics: Metrics,
        plugins: RoutingPlugins | None = None,
        tracker: LoadTracker | None = None,
        tracer_provider: trace.TracerProvider | None = None,
        traffic: TrafficSplit | None = None,
    ) -> None:
        self._config = config
        # Services: a request for a service's name goes to the revision the split chooses (None: no services).
        self._traffic = traffic
        self._discovery = discovery
        self._channels = channels
        self._metrics = metrics
        # Every request is routed by a profile (routing/profiles.py) built from the plugin types of `plugins`
        # (the built-in ones by default): generation by the configured one, embeddings by `embeddings`.
        self.scheduler, self._embed_scheduler = schedulers_for(
            (config.routing_profile, EMBEDDINGS_PROFILE), config.routing_profiles_file,
            RoutingEnv(block_chars=config.prefix_block_chars), plugins,
        )
        self._schedulers = (self.scheduler, self._embed_scheduler)
        self.tracker = tracker or LoadTracker()
        self.outliers = OutlierDetector(
            config.outlier_consecutive_failures, config.outlier_base_ejection_s, config.outlier_max_ejection_s
        )
        self.stats = StatsPoller(channels, discovery.addresses, interval_s=config.stats_interval_s,
                                 on_stats=self._runtime_report)
        # Keyed by address: what a replica carries for us is what load balancing sees first.
        self._in_flight: collections.Counter[str] = collections.Counter()
        self._known: set[str] = set()
        self._tracer = trace.get_tracer("clowder.balancer", tracer_provider=tracer_provider)
        # Hashing prompts into blocks is for prefix scoring; profiles without it skip the work.
        self._uses_blocks = self.scheduler.uses_blocks

    def in_flight(self, address: str) -> int:
        return self._in_flight[address]

    @property
    def total_in_flight(self) -> int:
        return sum(self._in_flight.values())

    def endpoints_changed(self, live: set[str]) -> None:
        """Forget what routing learned about replicas that deregistered (a restart comes back cold)."""
        for gone in self._known - live:
            for scheduler in self._schedulers:
                scheduler.forget(gone)
            self.outliers.forget(gone)
        self._known = set(live)

    def _runtime_report(self, address: str, stats: RuntimeStats) -> None:
        for scheduler in self._schedulers:
            scheduler.runtime_report(address, stats)

    def route_request(self, model: str, request: runtime_pb2.GenerateRequest, session: str = "") -> RouteRequest:
        blocks = block_hashes(_prompt_text(request), self._config.prefix_block_chars) if self._uses_blocks else ()
        return RouteRequest(model, blocks, session, request.sampling.adapter)

    def _candidates(self, endpoints: Sequence[ReadyEndpoint], tried: set[str]) -> list[Candidate]:
        out = []
        for e in endpoints:
            if e.address in tried:
                continue
            stats = self.stats.get(e.address)
            out.append(Candidate(
                e.replica_id, e.address, self._in_flight[e.address], running=stats.running, waiting=stats.waiting,
                ejected=self.outliers.ejected(e.address), reachable=stats.reachable,
                # The etcd endpoint lists a loaded adapter at once (GetStats polls catch up later).
                adapters=stats.adapters | e.adapters,
            ))
        return out

    def _choose(self, scheduler: Scheduler, route: RouteRequest, endpoints: Sequence[ReadyEndpoint],
                tried: set[str], prefer: str = "") -> Candidate:
        """The replica for the next try of any request: the one at `prefer` on the first try when it is ready
        and not ejected (the other choices of one request join the first's KV cache), else the profile's."""
        candidates = self._candidates(endpoints, tried)
        if prefer and not tried:
            for candidate in candidates:
                if candidate.address == prefer and not candidate.ejected and candidate.reachable:
                    return candidate
        return scheduler.schedule(route, candidates)

    async def _endpoints(self, model: str, deadline: float, tried: set[str]) -> list[ReadyEndpoint]:
        now = [e for e in self._discovery.endpoints(model) if e.address not in tried]
        if now and self._discovery.has_model(model):
            return now
        if not self._discovery.has_model(model):
            return await self._discovery.wait_for_endpoints(model, deadline - time.monotonic(), exclude=tried)
        # No ready replica: count the request as waiting, which is what wakes a deployment scaled to zero.
        with self.tracker.waiting(model):
            return await self._discovery.wait_for_endpoints(model, deadline - time.monotonic(), exclude=tried)

    def generate(
        self, model: str, request: runtime_pb2.GenerateRequest, session: str = "", route: RouteRequest | None = None,
        prefer: str = "", on_choice: Callable[[str], None] | None = None,
    ) -> AsyncGenerator[runtime_pb2.GenerateResponse, None]:
        """_generate's messages; a service's name first goes to the revision its traffic split chooses."""
        traffic = self._traffic
        target = traffic.choose(model, session) if traffic is not None else None
        if traffic is None or target is None:
            return self._generate(model, request, session, route, prefer, on_choice)
        return traffic.observe(target, self._generate(target.deployment, request, session, route, prefer,
                                                      on_choice))

    async def _generate(
        self, model: str, request: runtime_pb2.GenerateRequest, session: str = "", route: RouteRequest | None = None,
        prefer: str = "", on_choice: Callable[[str], None] | None = None,
    ) -> AsyncGenerator[runtime_pb2.GenerateResponse, None]:
        """Yield the runtime's messages for `request`; the last one carries finish_reason and usage.

        Raises ClowderError: NotFound (no such model), Unavailable (no ready
        replica within ready_timeout_s, or every replica tried failed),
        DeadlineExceeded, or the runtime's own error. Closing the generator
        cancels the runtime call. `prefer` names a replica address to try first (when it is ready and not
        ejected); `on_choice` learns each address tried.

        A replica that breaks after its first message (dies, stalls for stream_idle_timeout_s, resets the
        stream) is left, and the generation continues on another one from the text already yielded (see
        continuation.py), at most max_continuations times and within request_timeout_s of the start: the
        caller sees one stream whose counts add up. When no replica takes it up, the break's error is raised.
        """
        started = time.monotonic()
        # The bound of the whole request, continuations included.
        deadline = started + self._config.request_timeout_s
        route = route or self.route_request(model, request, session=session)
        tries = _Tries(request.request_id, started + self._config.ready_timeout_s, budget=self._config.max_attempts)
        image = self._discovery.image_configuration(model)
        progress = Progress(request, resolved_max_tokens(request, image.max_tokens))
        current = request
        # A continuation whose outcome is not known yet (the next replica has not sent its first message).
        pending = ""
        try:
            async with contextlib.aclosing(self._attempts(model, tries, self.scheduler, route, prefer)) as attempts:
                async for choice in attempts:
                    if on_choice is not None:
                        on_choice(choice.address)
                    try:
                        # aclosing: when our consumer stops early, the runtime call is cancelled now, not at GC.
                        stream = self._attempt(model, choice, current, route, started, deadline,
                                               first_try=current is request)
                        async with contextlib.aclosing(stream):
                            async for message in stream:
                                if pending:
                                    self._metrics.continuations.labels(model, "resumed").inc()
                                    pending = ""
                                yield progress.relay(message)
                        return
                    except _Retry as retry:
                        tries.last_error = retry.error
                    except _Broken as broken:
                        # (A break comes after a first message, so any continuation before it was resumed.)
                        following = self._continuation(model, choice, progress, broken, tries, deadline)
                        if following is None:
                            yield progress.length_finish()
                            self._metrics.continuations.labels(model, "finished").inc()
                            return
                        current, pending = following, broken.why
        except (asyncio.CancelledError, GeneratorExit):
            if pending:
                self._metrics.continuations.labels(model, "cancelled").inc()
                pending = ""
            raise
        finally:
            if pending:
                # No replica took it up (none left, none within the deadline, or it failed before its first
                # message in a way no other replica could help): the client gets the error event.
                self._metrics.continuations.labels(model, "failed").inc()
                log.warning("request_id=%s model=%s could not be continued after %d tokens",
                            request.request_id, model, progress.tokens)

    def _continuation(self, model: str, choice: Candidate, progress: Progress, broken: _Broken, tries: _Tries,
                      deadline: float) -> runtime_pb2.GenerateRequest | None:
        """The request that continues a broken stream on another replica (None: no token was left to
        generate), or the break's error raised when it cannot be continued."""
        rid = progress.request.request_id
        refusal = progress.refusal()
        if not refusal and progress.continuations >= self._config.max_continuations:
            refusal = f"max_continuations ({self._config.max_continuations}) reached"
        if not refusal and time.monotonic() >= deadline:
            refusal = "the request's deadline passed"
        if refusal:
            self._metrics.continuations.labels(model, "refused").inc()
            log.warning("request_id=%s model=%s replica=%s %s after %d tokens; not continued: %s",
                        rid, model, choice.replica_id, broken.why, progress.tokens, refusal)
            raise broken.error
        following = progress.begin_continuation()
        log.warning("request_id=%s model=%s replica=%s %s after %d tokens (%d characters sent); continuing on"
                    " another replica (continuation %d, %d tokens left)", rid, model, choice.replica_id, broken.why,
                    progress.tokens, len(progress.text), progress.continuations, progress.max_tokens - progress.tokens)
        tries.last_error = broken.error
        # The next replica gets as many tries for its first message as the first one had, within the deadline.
        tries.budget = len(tries.tried) + self._config.max_attempts
        tries.ready_deadline = min(time.monotonic() + self._config.ready_timeout_s, deadline)
        tries.continuing = True
        return following

    async def _attempts(self, model: str, tries: _Tries, scheduler: Scheduler, route: RouteRequest,
                        prefer: str = "") -> AsyncGenerator[Candidate, None]:
        """The replica for each try of one request of any kind, chosen by `scheduler` among the ready ones not
        tried yet, up to max_attempts tries (waiting at most until tries.ready_deadline for one to be ready).
        The caller records in `tries` why the last try failed; when no replica is left, or no try, that
        failure is raised: it says more than "no endpoint"."""
        if self._discovery.ready and self._discovery.has_model(model):
            self.tracker.request(model)
        attempt = 0
        while attempt < max(1, tries.budget):
            attempt += 1
            try:
                endpoints = await self._endpoints(model, tries.ready_deadline, tries.tried)
            except Unavailable:
                if tries.last_error is not None:
                    raise tries.last_error from None
                raise
            if attempt > 1 and not tries.continuing:
                self._metrics.retries.labels(model).inc()
            tries.continuing = False
            if route.adapter:
                endpoints = await self._adapter_holders(model, route.adapter, endpoints, tries)
            choice = self._choose(scheduler, route, endpoints, tries.tried, prefer)
            tries.tried.add(choice.address)
            yield choice
        log.warning("request_id=%s model=%s gave up after %d attempts", tries.request_id, model, len(tries.tried))
        assert tries.last_error is not None
        raise tries.last_error

    async def _adapter_holders(self, model: str, adapter: str, endpoints: list[ReadyEndpoint], tries: _Tries
                               ) -> list[ReadyEndpoint]:
        """The endpoints once one of them lists `adapter`, waiting up to ADAPTER_WAIT_S (within the ready
        deadline) for one to; the adapter filter then refuses the request if none does."""
        deadline = min(tries.ready_deadline, time.monotonic() + ADAPTER_WAIT_S)
        while (not any(adapter in e.adapters or adapter in self.stats.get(e.address).adapters for e in endpoints)
               and (left := deadline - time.monotonic()) > 0):
            # Short slices: a GetStats poll (a runtime whose endpoint does not list its adapters) changes no key.
            await self._discovery.wait_for_change(min(left, 0.25))
            endpoints = [e for e in self._discovery.endpoints(model) if e.address not in tries.tried] or endpoints
        return endpoints

    async def embed(self, model: str, request: runtime_pb2.EmbedRequest) -> runtime_pb2.EmbedResponse:
        """_embed's answer; a service's name first goes to the revision its traffic split chooses."""
        traffic = self._traffic
        target = traffic.choose(model) if traffic is not None else None
        if traffic is None or target is None:
            return await self._embed(model, request)
        return await traffic.observe_call(target, self._embed(target.deployment, request))

    async def _embed(self, model: str, request: runtime_pb2.EmbedRequest) -> runtime_pb2.EmbedResponse:
        """Embeddings of all of `request.inputs`, in order: batches of at most EMBED_BATCH inputs (what one
        runtime call takes), each routed on its own, so a big request spreads over replicas."""
        if len(request.inputs) <= EMBED_BATCH:
            return await self._embed_batch(model, request)
        batches = []
        for start in range(0, len(request.inputs), EMBED_BATCH):
            batches.append(runtime_pb2.EmbedRequest(request_id=f"{request.request_id}-{start // EMBED_BATCH}",
                                                    inputs=request.inputs[start:start + EMBED_BATCH]))
        tasks = [asyncio.ensure_future(self._embed_offset(model, batch, k * EMBED_BATCH))
                 for k, batch in enumerate(batches)]
        try:
            results = await asyncio.gather(*tasks)
        except BaseException:
            # One batch failed (or we were cancelled): the others' answers are of no use now.
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
        merged = runtime_pb2.EmbedResponse(prompt_tokens=sum(r.prompt_tokens for r in results))
        for result in results:
            merged.embeddings.extend(result.embeddings)
        return merged

    async def _embed_offset(self, model: str, request: runtime_pb2.EmbedRequest, offset: int
                            ) -> runtime_pb2.EmbedResponse:
        try:
            return await self._embed_batch(model, request)
        except ClowderError as err:
            # The runtime numbers the inputs of its batch; the client numbers them in the whole request.
            err.violations = [FieldViolation(_shift_index(v.field, "inputs", offset), v.description)
                              for v in err.violations]
            raise

    async def _embed_batch(self, model: str, request: runtime_pb2.EmbedRequest) -> runtime_pb2.EmbedResponse:
        """The runtime's Embed on the replica the `embeddings` profile picks (built in: the least loaded ready
        one); another replica when one fails to answer."""
        tries = _Tries(request.request_id, time.monotonic() + self._config.ready_timeout_s,
                       budget=self._config.max_attempts)
        route = RouteRequest(model)
        async with contextlib.aclosing(self._attempts(model, tries, self._embed_scheduler, route)) as attempts:
            async for choice in attempts:
                try:
                    with self._sent(model, self._embed_scheduler, route, choice) as sent:
                        async with self._channels.stub(choice.address) as stub:
                            response = await stub.Embed(request, timeout=self._config.request_timeout_s,
                                                        metadata=((REQUEST_ID_KEY, request.request_id),))
                        sent.finished(())
                    self.outliers.success(choice.address)
                    return response
                except grpc.aio.AioRpcError as err:
                    failure = self._first_error(model, choice, err, request.request_id)
                    if not isinstance(failure, _Retry):
                        raise failure from None
                    tries.last_error = failure.error
        raise AssertionError("_attempts ends by raising")

    @contextlib.contextmanager
    def _sent(self, model: str, scheduler: Scheduler, route: RouteRequest, choice: Candidate) -> Iterator[_Sent]:
        """One try of a request of any kind on `choice`: counted in flight (ours, and the load report's), and
        told to the profile's plugins: routed now, prefilled exactly once (at the latest when the try ends)."""
        address = choice.address
        self._in_flight[address] += 1
        self._metrics.replica(model, choice.replica_id).routed.inc()
        sent = _Sent(scheduler, route, choice)
        logcontext.REPLICA.set(choice.replica_id)
        try:
            with self.tracker.in_flight(model):
                yield sent
        finally:
            sent.prefilled()
            self._in_flight[address] -= 1
            if self._in_flight[address] <= 0:
                del self._in_flight[address]

    async def _attempt(
        self, model: str, choice: Candidate, request: runtime_pb2.GenerateRequest, route: RouteRequest,
        started: float, deadline: float, first_try: bool = True,
    ) -> AsyncGenerator[runtime_pb2.GenerateResponse, None]:
        rid = request.request_id
        address = choice.address
        per_model = self._metrics.model(model)
        per_replica = self._metrics.replica(model, choice.replica_id)
        # DEBUG: at INFO a second line per request costs more than the rest of the routing put together;
        # the access-log line names the replica instead.
        log.debug("request_id=%s model=%s routed to replica=%s address=%s", rid, model, choice.replica_id, address)
        call = None
        watchdog: _Watchdog | None = None
        # The answer, for the prefix index (only profiles that score prefixes need it).
        texts: list[str] | None = [] if self._uses_blocks else None
        # Not "as current": the span must not leak into the consumer's context between yields.
        span = self._tracer.start_span(
            "balancer.generate", attributes={"clowder.model": model, "clowder.replica": choice.replica_id,
                                             "clowder.request_id": rid},
        )
        with self._sent(model, self.scheduler, route, choice) as sent, contextlib.closing(_SpanEnder(span)):
            metadata: tuple[tuple[str, str], ...] = ((REQUEST_ID_KEY, rid),)
            if span.get_span_context().is_valid:
                # The runtime's server span becomes a child of this one.
                carrier: dict[str, str] = {}
                propagate.inject(carrier, context=trace.set_span_in_context(span))
                metadata += tuple(carrier.items())
            per_model.in_flight.inc()
            try:
                async with self._channels.stub(address) as stub:
                    call = stub.Generate(request, timeout=max(0.001, deadline - time.monotonic()),
                                         metadata=metadata)
                    watchdog = _Watchdog(call)
                    first = await self._read(model, choice, call, rid, watchdog, first=True)
                    sent.prefilled()
                    first_at = time.monotonic()
                    if first_try:
                        # A continuation's first message is no client's first token.
                        per_model.time_to_first_token.observe(first_at - started)
                        per_replica.time_to_first_token.observe(first_at - started)
                    message, previous = first, first_at
                    itl = per_model.inter_token_latency
                    while True:
                        if texts is not None:
                            texts.append(message.text)
                        if message.finish_reason != runtime_pb2.FINISH_REASON_UNSPECIFIED:
                            self._finished(per_model, per_replica, sent, request, texts, message, first_at)
                            yield message
                            return
                        yield message
                        message = await self._read(model, choice, call, rid, watchdog, first=False)
                        now = time.monotonic()
                        itl.observe(now - previous)
                        previous = now
            finally:
                if watchdog is not None:
                    watchdog.disarm()
                if call is not None and not call.done():
                    # The client went away or we gave up: free the runtime's slot now, not at the deadline.
                    call.cancel()
                per_model.in_flight.dec()

    def _finished(self, per_model: ModelMetrics, per_replica: ReplicaMetrics, sent: _Sent,
                  request: runtime_pb2.GenerateRequest, texts: list[str] | None,
                  last: runtime_pb2.GenerateResponse, first_at: float) -> None:
        self.outliers.success(sent.choice.address)
        tokens = last.usage.completion_tokens
        per_model.generated_tokens.inc(tokens)
        elapsed = time.monotonic() - first_at
        if tokens > 1 and elapsed > 0:
            per_replica.tokens_per_second.observe((tokens - 1) / elapsed)
        blocks: tuple[int, ...] = ()
        if texts is not None:
            answer = "".join(texts)
            if request.HasField("chat"):
                answer = request.chat.assistant_prefix + answer
                full = _prompt_text(request) + render_chat([runtime_pb2.ChatMessage(role="assistant",
                                                                                   content=answer)])
            else:
                full = request.prompt + answer
            blocks = block_hashes(full, self._config.prefix_block_chars)
        sent.finished(blocks)

    def _stream_error(self, model: str, choice: Candidate, err: grpc.aio.AioRpcError, rid: str) -> ClowderError:
        self._fail(model, choice)
        log.warning("request_id=%s replica=%s failed mid-stream: %s %s",
                    rid, choice.replica_id, err.code().name, err.details())
        return self._relay(model, err, streaming=True)

    async def _read(
        self, model: str, choice: Candidate, call: grpc.aio.UnaryStreamCall, rid: str, watchdog: _Watchdog,
        first: bool,
    ) -> runtime_pb2.GenerateResponse:
        """The call's next message, within first_token_timeout_s for the `first` one, stream_idle_timeout_s after.

        Before the first message a failure is final, or a _Retry when another replica may try (_first_error).
        After it, a failure that says the replica (or the way to it) broke is a _Broken: the stream may
        continue on another replica; any other is final.
        """
        timeout = self._config.first_token_timeout_s if first else self._config.stream_idle_timeout_s
        watchdog.arm(timeout)
        try:
            message = await call.read()
        except (asyncio.CancelledError, grpc.aio.AioRpcError) as err:
            if not watchdog.fired:
                if isinstance(err, asyncio.CancelledError):
                    raise
                if first:
                    raise self._first_error(model, choice, err, rid) from None
                error = self._stream_error(model, choice, err, rid)
                if err.code() in CONTINUABLE:
                    raise _Broken(error, f"failed mid-stream ({err.code().name})") from None
                raise error from None
            self._fail(model, choice)
            if first:
                raise DeadlineExceeded(
                    f"the replica of model '{model}' sent no token within {timeout:g}s", reason="FIRST_TOKEN_TIMEOUT"
                ) from None
            log.warning("request_id=%s replica=%s stalled mid-stream for %gs", rid, choice.replica_id, timeout)
            raise _Broken(DeadlineExceeded(
                f"the replica of model '{model}' sent nothing for {timeout:g}s", reason="STREAM_IDLE_TIMEOUT"
            ), f"stalled mid-stream (nothing for {timeout:g}s)") from None
        if message is grpc.aio.EOF:
            self._fail(model, choice)
            if first:
                raise Internal(f"a replica of model '{model}' ended the stream without a result")
            raise _Broken(Unavailable(f"a replica of model '{model}' ended the stream before finishing"),
                          "ended the stream before finishing")
        return message

    def _first_error(self, model: str, choice: Candidate, err: grpc.aio.AioRpcError, rid: str) -> Exception:
        """What to raise for a call that failed before its first message: _Retry when another replica may try."""
        if err.code() in RETRYABLE:
            if err.code() == grpc.StatusCode.UNAVAILABLE:
                # A refused connection is probably a dead process whose lease has not expired yet (or whose
                # endpoint already left etcd and was only a fallback: it is not one any more).
                self._fail(model, choice, eject_for=self._config.failure_cooldown_s)
                self._discovery.connect_failed(choice.address)
            log.warning("request_id=%s replica=%s address=%s failed before the first token: %s %s",
                        rid, choice.replica_id, choice.address, err.code().name, err.details())
            return _Retry(self._relay(model, err, streaming=False))
        if err.code() in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.DATA_LOSS):
            self._fail(model, choice)
        return self._relay(model, err, streaming=False)

    def _fail(self, model: str, choice: Candidate, eject_for: float | None = None) -> None:
        was = self.outliers.ejected(choice.address)
        if self.outliers.failure(choice.address, eject_for) and not was:
            self._metrics.ejections.labels(model, choice.replica_id).inc()
            log.warning("replica=%s of model=%s ejected after failures", choice.replica_id, model)

    def _relay(self, model: str, err: grpc.aio.AioRpcError, streaming: bool) -> ClowderError:
        """The runtime's error as ours; transport failures are reworded so no internal address leaks."""
        code = err.code()
        if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED):
            if streaming:
                return Unavailable(f"the replica of model '{model}' serving this request failed", retry_after=1.0)
            return Unavailable(f"no replica of model '{model}' could serve the request", retry_after=1.0)
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return DeadlineExceeded(f"the request exceeded its {self._config.request_timeout_s:g}s deadline")
        return from_rpc_error(err)


class _Watchdog:
    """Cancels a call that stays silent too long: one timer per call, moved on at each message.

    asyncio.wait_for around every read would cost a task per token, the largest share of the
    balancer's own per-request time; even a new timer per message costs a heap push. So arm() only
    moves a deadline, and the one pending timer, when it fires early, sleeps on to the deadline.
    """

    def __init__(self, call: grpc.aio.UnaryStreamCall) -> None:
        self._call = call
        self._loop = asyncio.get_running_loop()
        self._handle: asyncio.TimerHandle | None = None
        self._deadline = 0.0
        self.fired = False

    def arm(self, seconds: float) -> None:
        self._deadline = self._loop.time() + seconds
        if self._handle is None:
            self._handle = self._loop.call_at(self._deadline, self._check)
        elif self._handle.when() > self._deadline:
            # A shorter timeout than the pending one: that timer would fire too late.
            self._handle.cancel()
            self._handle = self._loop.call_at(self._deadline, self._check)

    def _check(self) -> None:
        if self._loop.time() < self._deadline:
            self._handle = self._loop.call_at(self._deadline, self._check)
            return
        self._handle = None
        self.fired = True
        self._call.cancel()

    def disarm(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None


class _SpanEnder:
    def __init__(self, span: trace.Span) -> None:
        self._span = span

    def close(self) -> None:
        self._span.end()


def _shift_index(field: str, name: str, offset: int) -> str:
    prefix = name + "["
    if not field.startswith(prefix) or "]" not in field:
        return field
    index, rest = field[len(prefix):].split("]", 1)
    return f"{prefix}{int(index) + offset}]{rest}" if index.isdigit() else field


def _prompt_text(request: runtime_pb2.GenerateRequest) -> str:
    if request.HasField("chat"):
        return render_chat(request.chat.messages)
    return request.prompt
