"""The routing core both API faces share: find the model's replicas, pick one, relay its stream, fail over."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from typing import AsyncIterator, Sequence

import grpc

from clowder.runtime.v1 import runtime_pb2
from clowder_common.errors import ClowderError, DeadlineExceeded, Internal, Unavailable, from_rpc_error

from clowder_balancer.channels import ChannelPool
from clowder_balancer.config import BalancerConfig
from clowder_balancer.discovery import Discovery, ReadyEndpoint
from clowder_balancer.metrics import Metrics
from clowder_balancer.picker import Candidate, LeastInFlightPicker, Picker

log = logging.getLogger(__name__)

# Failures before the first message that another replica may not have. Nothing has reached the client
# yet and generation has no side effects, so trying elsewhere is safe.
RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED})


class _Retry(Exception):
    """An attempt failed before its first message; the next replica may try."""

    def __init__(self, error: ClowderError) -> None:
        super().__init__(error.message)
        self.error = error


class Router:
    """Streams GenerateResponse messages of one request from the least-loaded ready replica."""

    def __init__(
        self,
        config: BalancerConfig,
        discovery: Discovery,
        channels: ChannelPool,
        metrics: Metrics,
        picker: Picker | None = None,
    ) -> None:
        self._config = config
        self._discovery = discovery
        self._channels = channels
        self._metrics = metrics
        self._picker = picker or LeastInFlightPicker()
        # Keyed by address: what a replica carries for us is what the picker balances.
        self._in_flight: collections.Counter[str] = collections.Counter()
        self._cooldown_until: dict[str, float] = {}

    def in_flight(self, address: str) -> int:
        return self._in_flight[address]

    @property
    def total_in_flight(self) -> int:
        return sum(self._in_flight.values())

    def _cooling(self, address: str, now: float) -> bool:
        until = self._cooldown_until.get(address)
        if until is None:
            return False
        if until <= now:
            del self._cooldown_until[address]
            return False
        return True

    def _choose(self, endpoints: Sequence[ReadyEndpoint], tried: set[str]) -> Candidate:
        now = time.monotonic()
        candidates = [
            Candidate(e.replica_id, e.address, self._in_flight[e.address]) for e in endpoints if e.address not in tried
        ]
        # A replica that just refused a connection is probably dead with its lease still alive;
        # prefer the others, but keep it as a last resort.
        healthy = [c for c in candidates if not self._cooling(c.address, now)]
        return self._picker.pick(healthy or candidates)

    async def generate(
        self, model: str, request: runtime_pb2.GenerateRequest
    ) -> AsyncIterator[runtime_pb2.GenerateResponse]:
        """Yield the runtime's messages for `request`; the last one carries finish_reason and usage.

        Raises ClowderError: NotFound (no such model), Unavailable (no ready
        replica within ready_timeout_s, or every replica tried failed),
        DeadlineExceeded, or the runtime's own error. Closing the generator
        cancels the runtime call.
        """
        rid = request.request_id
        started = time.monotonic()
        ready_deadline = started + self._config.ready_timeout_s
        tried: set[str] = set()
        last_error: ClowderError | None = None
        for attempt in range(1, max(1, self._config.max_attempts) + 1):
            try:
                endpoints = await self._discovery.wait_for_endpoints(
                    model, ready_deadline - time.monotonic(), exclude=tried
                )
            except Unavailable:
                if last_error is not None:
                    raise last_error from None
                raise
            choice = self._choose(endpoints, tried)
            tried.add(choice.address)
            if attempt > 1:
                self._metrics.retries.labels(model).inc()
            try:
                # aclosing: when our consumer stops early, the runtime call is cancelled now, not at GC.
                async with contextlib.aclosing(self._attempt(model, choice, request, started)) as stream:
                    async for message in stream:
                        yield message
                return
            except _Retry as retry:
                last_error = retry.error
        log.warning("request_id=%s model=%s gave up after %d attempts", rid, model, len(tried))
        assert last_error is not None
        raise last_error

    async def _attempt(
        self, model: str, choice: Candidate, request: runtime_pb2.GenerateRequest, started: float
    ) -> AsyncIterator[runtime_pb2.GenerateResponse]:
        rid = request.request_id
        address = choice.address
        self._in_flight[address] += 1
        self._metrics.in_flight.labels(model).inc()
        self._metrics.routed.labels(model, choice.replica_id).inc()
        log.info("request_id=%s model=%s routed to replica=%s address=%s", rid, model, choice.replica_id, address)
        call = None
        try:
            async with self._channels.stub(address) as stub:
                call = stub.Generate(
                    request, timeout=self._config.request_timeout_s, metadata=(("x-request-id", rid),)
                )
                first = await self._first_message(model, choice, call, rid)
                self._cooldown_until.pop(address, None)
                self._metrics.time_to_first_token.labels(model).observe(time.monotonic() - started)
                message = first
                while True:
                    if message.finish_reason != runtime_pb2.FINISH_REASON_UNSPECIFIED:
                        self._metrics.generated_tokens.labels(model).inc(message.usage.completion_tokens)
                        yield message
                        return
                    yield message
                    try:
                        message = await call.read()
                    except grpc.aio.AioRpcError as err:
                        log.warning("request_id=%s replica=%s failed mid-stream: %s %s",
                                    rid, choice.replica_id, err.code().name, err.details())
                        raise self._relay(model, err, streaming=True) from None
                    if message is grpc.aio.EOF:
                        raise Unavailable(f"a replica of model '{model}' ended the stream before finishing")
        finally:
            if call is not None and not call.done():
                # The client went away or we gave up: free the runtime's slot now, not at the deadline.
                call.cancel()
            self._in_flight[address] -= 1
            if self._in_flight[address] <= 0:
                del self._in_flight[address]
            self._metrics.in_flight.labels(model).dec()

    async def _first_message(
        self, model: str, choice: Candidate, call: grpc.aio.UnaryStreamCall, rid: str
    ) -> runtime_pb2.GenerateResponse:
        timeout = self._config.first_token_timeout_s
        try:
            first = await asyncio.wait_for(call.read(), timeout)
        except asyncio.TimeoutError:
            raise DeadlineExceeded(
                f"the replica of model '{model}' sent no token within {timeout:g}s", reason="FIRST_TOKEN_TIMEOUT"
            ) from None
        except grpc.aio.AioRpcError as err:
            if err.code() in RETRYABLE:
                if err.code() == grpc.StatusCode.UNAVAILABLE:
                    self._cooldown_until[choice.address] = time.monotonic() + self._config.failure_cooldown_s
                log.warning("request_id=%s replica=%s address=%s failed before the first token: %s %s",
                            rid, choice.replica_id, choice.address, err.code().name, err.details())
                raise _Retry(self._relay(model, err, streaming=False)) from None
            raise self._relay(model, err, streaming=False) from None
        if first is grpc.aio.EOF:
            raise Internal(f"a replica of model '{model}' ended the stream without a result")
        return first

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
