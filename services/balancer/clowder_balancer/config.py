"""Balancer configuration: where it listens and how long a request may wait at each step."""

from __future__ import annotations

from dataclasses import dataclass

from clowder_common.config import EtcdConfig
from clowder_common.errors import InvalidArgument
from clowder_common.security import SecurityConfig


@dataclass(frozen=True)
class BalancerConfig(EtcdConfig, SecurityConfig):
    # OpenAI-compatible HTTP API (host:port; port 0 picks a free one).
    http_listen: str = "127.0.0.1:3090"
    # gRPC InferenceService (host:port; port 0 picks a free one).
    grpc_listen: str = "127.0.0.1:3091"
    # How long a request for a deployment without a ready replica waits for one before a 503
    # (the controller may be restarting or waking it).
    ready_timeout_s: float = 60.0
    # Deadline of one runtime call, generation included.
    request_timeout_s: float = 600.0
    # A runtime that sends nothing for this long after the call opened is given up on (504).
    first_token_timeout_s: float = 60.0
    # Replicas one request may try before the first token (the first try included).
    max_attempts: int = 3
    # A replica that refused a connection is passed over for this long while others are ready.
    failure_cooldown_s: float = 5.0
    # Shutdown lets in-flight streams finish for this long before cutting them.
    drain_grace_s: float = 10.0
    # Larger request bodies get a 413.
    max_body_bytes: int = 4 * 1024 * 1024
    # Identifies this balancer in logs and names its load report (load/<name>).
    name: str = "balancer"
    # gRPC address of the controller: the REST bridge under /api/v1 forwards control-plane calls there
    # ("" serves only the balancer's own ApiKeyService through the bridge).
    controller_address: str = "127.0.0.1:3092"
    # Routing profile: a built-in one (default, least-load, round-robin, random, least-in-flight) or one
    # defined in routing_profiles_file (YAML: `profiles: {NAME: {filters: [...], scorers: [{type, name, weight,
    # ...parameters}], picker: TYPE}}`; the `embeddings` profile routes embedding requests).
    routing_profile: str = "default"
    routing_profiles_file: str = ""
    # Characters per prompt block in the prefix-affinity index.
    prefix_block_chars: int = 256
    # Header (HTTP) / metadata key (gRPC) whose value pins a conversation to a replica.
    session_header: str = "x-session-id"
    # How often every runtime's GetStats is polled (0 turns polling off).
    stats_interval_s: float = 0.5
    # A stream that sends nothing for this long after its first message is taken to be stalled (a paused or
    # wedged runtime): it is cancelled there and continued on another replica. Per message, not per token (a
    # runtime whose reader lags merges tokens into fewer messages); 10 s is far above the gap between two
    # messages of a busy replica here (well under 1 s), and short enough that a client still waits.
    stream_idle_timeout_s: float = 10.0
    # Times one request's stream may move to another replica after its first token (replica died, stalled or
    # reset the stream). 0 turns mid-stream failover off (the client gets an error event, as before). A bound,
    # so a request that kills every replica it lands on cannot take the whole deployment down.
    max_continuations: int = 3
    # An endpoint that left etcd stays known for this long as a fallback, used only while its model has no
    # registered endpoint at all: after an etcd outage longer than the runtimes' lease TTL (5 s) their keys
    # are gone until they re-register (about TTL/3 later), though the runtimes never stopped serving. A
    # failed connection drops the fallback at once, so a replica that really went away costs one refused
    # connect (retried elsewhere); 0 turns the fallback off.
    endpoint_grace_s: float = 30.0
    # Outlier detection: failures in a row that eject a replica, and for how long (doubling per ejection).
    outlier_consecutive_failures: int = 3
    outlier_base_ejection_s: float = 10.0
    outlier_max_ejection_s: float = 120.0
    # Require a user API key (`Authorization: Bearer ck-...`) on /v1/* and InferenceService. Off by default so
    # a fresh cluster works keyless; a key that is sent is checked either way (and grants its groups).
    require_api_keys: bool = False
    # Load reports to etcd (load/<name>): interval and lease TTL.
    load_report_interval_s: float = 1.0
    load_lease_ttl_s: int = 5
    # Tenants (tenancy/): usage sums go to etcd this often (a killed balancer loses at most one interval).
    usage_flush_interval_s: float = 2.0
    # Per-key limits wait this long for etcd, then count on this balancer alone for quota_local_fallback_s.
    quota_etcd_timeout_s: float = 1.0
    quota_local_fallback_s: float = 5.0
    # Tokens a request without max_tokens is expected to generate per choice (limit and budget reservations).
    completion_estimate_tokens: int = 256
    # Requests waiting per model while its replicas' slots are all busy, and for how long at most (503 after).
    queue_max_per_model: int = 256
    queue_timeout_s: float = 60.0
    # A tenant seen this recently with nothing running keeps one slot free for its next request (fairness/).
    queue_idle_tenant_window_s: float = 10.0
    # Batch jobs (/v1/files, /v1/batches, batch/): the largest input file (held in memory while stored), lines a
    # balancer claims at a time, invocations one balancer runs at once, slots per deployment batch work leaves
    # to interactive requests, and the TTL of the lease its claims hang on (a dead balancer's chunks are free
    # again this long after it died).
    batch_max_file_bytes: int = 100 * 1024 * 1024
    batch_chunk_lines: int = 16
    batch_max_in_flight: int = 16
    batch_reserve_slots: int = 1
    batch_claim_ttl_s: int = 5

    def __post_init__(self) -> None:
        for field in ("http_listen", "grpc_listen"):
            split_host_port(getattr(self, field), field)
        for field in ("ready_timeout_s", "drain_grace_s", "failure_cooldown_s", "stats_interval_s",
                      "outlier_base_ejection_s", "outlier_max_ejection_s", "endpoint_grace_s"):
            if getattr(self, field) < 0:
                raise InvalidArgument(f"{field} must not be negative", field=field)
        for field in ("request_timeout_s", "first_token_timeout_s", "stream_idle_timeout_s",
                      "load_report_interval_s"):
            if getattr(self, field) <= 0:
                raise InvalidArgument(f"{field} must be positive", field=field)
        if self.max_continuations < 0:
            raise InvalidArgument("max_continuations must not be negative", field="max_continuations")
        if self.max_attempts < 1:
            raise InvalidArgument("max_attempts must be at least 1", field="max_attempts")
        if self.outlier_consecutive_failures < 1:
            raise InvalidArgument("outlier_consecutive_failures must be at least 1",
                                  field="outlier_consecutive_failures")
        if self.prefix_block_chars < 16:
            raise InvalidArgument("prefix_block_chars must be at least 16", field="prefix_block_chars")
        if self.load_lease_ttl_s < 2:
            raise InvalidArgument("load_lease_ttl_s must be at least 2", field="load_lease_ttl_s")
        if not self.session_header or self.session_header != self.session_header.lower():
            raise InvalidArgument("session_header must be a non-empty lowercase header name", field="session_header")
        for field in ("batch_max_file_bytes", "batch_chunk_lines", "batch_max_in_flight"):
            if getattr(self, field) < 1:
                raise InvalidArgument(f"{field} must be at least 1", field=field)
        if self.batch_reserve_slots < 0:
            raise InvalidArgument("batch_reserve_slots must not be negative", field="batch_reserve_slots")
        if self.batch_claim_ttl_s < 2:
            raise InvalidArgument("batch_claim_ttl_s must be at least 2", field="batch_claim_ttl_s")
        if self.max_body_bytes < 1024:
            raise InvalidArgument("max_body_bytes must be at least 1024", field="max_body_bytes")


def split_host_port(address: str, field: str) -> tuple[str, int]:
    """("host", port) of "host:port" ("[::1]:80" too); InvalidArgument naming `field` otherwise."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise InvalidArgument(f"{field} {address!r} is not host:port", field=field)
    return host.strip("[]") or "127.0.0.1", int(port)
