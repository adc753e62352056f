"""Prometheus metrics of one balancer, in a registry of its own (no process-global state)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

# Label value for models that do not exist: client-chosen names must not grow the label set without bound.
UNKNOWN_MODEL = "_unknown"
# Outcome of requests whose client went away (nginx's "client closed request").
CLIENT_CLOSED = 499

ITL_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
TPS_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500)
TTFT_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


MAX_CACHED_REPLICAS = 4096


@dataclass(frozen=True)
class ModelMetrics:
    time_to_first_token: Any
    in_flight: Any
    inter_token_latency: Any
    generated_tokens: Any


@dataclass(frozen=True)
class ReplicaMetrics:
    routed: Any
    time_to_first_token: Any
    tokens_per_second: Any


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self._models: dict[str, ModelMetrics] = {}
        self._replicas: dict[tuple[str, str], ReplicaMetrics] = {}
        self._outcomes: dict[tuple[str, str, int], Any] = {}
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "clowder_balancer_requests", "Inference requests by model, API face and outcome (HTTP status).",
            ["model", "api", "status"], registry=self.registry,
        )
        self.time_to_first_token = Histogram(
            "clowder_balancer_time_to_first_token_seconds",
            "From routing a request to the first message from its runtime.",
            ["model"], buckets=TTFT_BUCKETS, registry=self.registry,
        )
        self.generated_tokens = Counter(
            "clowder_balancer_generated_tokens", "Completion tokens runtimes reported.",
            ["model"], registry=self.registry,
        )
        self.routed = Counter(
            "clowder_balancer_routed", "Runtime calls opened, by replica.",
            ["model", "replica"], registry=self.registry,
        )
        self.retries = Counter(
            "clowder_balancer_retries", "Calls retried on another replica after failing before the first token.",
            ["model"], registry=self.registry,
        )
        self.continuations = Counter(
            "clowder_balancer_continuations",
            "Streams that broke after their first token (replica died, stalled, reset the stream), by what came"
            " of continuing them on another replica: resumed (another replica took over), finished (no token"
            " was left to generate), refused (not continuable: json_object output, a forced tool call,"
            " max_continuations, the deadline), failed (no replica took over in time), cancelled (the client"
            " left meanwhile).",
            ["model", "outcome"], registry=self.registry,
        )
        self.in_flight = Gauge(
            "clowder_balancer_requests_in_flight", "Runtime calls open now.", ["model"], registry=self.registry,
        )

        self.replica_ttft = Histogram(
            "clowder_balancer_replica_time_to_first_token_seconds",
            "From routing a request to the first message, by the replica that served it.",
            ["model", "replica"], buckets=TTFT_BUCKETS, registry=self.registry,
        )
        self.inter_token_latency = Histogram(
            "clowder_balancer_inter_token_latency_seconds", "Time between consecutive messages of one stream.",
            ["model"], buckets=ITL_BUCKETS, registry=self.registry,
        )
        self.tokens_per_second = Histogram(
            "clowder_balancer_tokens_per_second", "Decode speed of finished requests after their first token.",
            ["model", "replica"], buckets=TPS_BUCKETS, registry=self.registry,
        )
        self.ejections = Counter(
            "clowder_balancer_ejections", "Replicas ejected by outlier detection.",
            ["model", "replica"], registry=self.registry,
        )

    def request_done(self, model: str, api: str, status: int) -> None:
        key = (model, api, status)
        counter = self._outcomes.get(key)
        if counter is None:
            if len(self._outcomes) > MAX_CACHED_REPLICAS:
                self._outcomes.clear()
            counter = self._outcomes[key] = self.requests.labels(model, api, str(status))
        counter.inc()

    def model(self, model: str) -> "ModelMetrics":
        """The per-model children, looked up once: labels() takes a lock and builds a key on every call."""
        found = self._models.get(model)
        if found is None:
            found = self._models[model] = ModelMetrics(
                self.time_to_first_token.labels(model), self.in_flight.labels(model),
                self.inter_token_latency.labels(model), self.generated_tokens.labels(model))
        return found

    def replica(self, model: str, replica: str) -> "ReplicaMetrics":
        key = (model, replica)
        found = self._replicas.get(key)
        if found is None:
            if len(self._replicas) > MAX_CACHED_REPLICAS:
                self._replicas.clear()  # replicas come and go; the series stay in the registry regardless
            found = self._replicas[key] = ReplicaMetrics(
                self.routed.labels(model, replica), self.replica_ttft.labels(model, replica),
                self.tokens_per_second.labels(model, replica))
        return found

    def render(self) -> bytes:
        return generate_latest(self.registry)
