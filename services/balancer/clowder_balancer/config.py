"""Balancer configuration: where it listens and how long a request may wait at each step."""

from __future__ import annotations

from dataclasses import dataclass

from clowder_common.config import EtcdConfig
from clowder_common.errors import InvalidArgument


@dataclass(frozen=True)
class BalancerConfig(EtcdConfig):
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
    # Identifies this balancer in logs.
    name: str = "balancer"

    def __post_init__(self) -> None:
        for field in ("http_listen", "grpc_listen"):
            split_host_port(getattr(self, field), field)
        for field in ("ready_timeout_s", "drain_grace_s", "failure_cooldown_s"):
            if getattr(self, field) < 0:
                raise InvalidArgument(f"{field} must not be negative", field=field)
        for field in ("request_timeout_s", "first_token_timeout_s"):
            if getattr(self, field) <= 0:
                raise InvalidArgument(f"{field} must be positive", field=field)
        if self.max_attempts < 1:
            raise InvalidArgument("max_attempts must be at least 1", field="max_attempts")
        if self.max_body_bytes < 1024:
            raise InvalidArgument("max_body_bytes must be at least 1024", field="max_body_bytes")


def split_host_port(address: str, field: str) -> tuple[str, int]:
    """("host", port) of "host:port" ("[::1]:80" too); InvalidArgument naming `field` otherwise."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise InvalidArgument(f"{field} {address!r} is not host:port", field=field)
    return host.strip("[]") or "127.0.0.1", int(port)
