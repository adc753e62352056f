"""How the CLI shows sizes and replica states."""

from __future__ import annotations

from clowder.controller.v1 import resources_pb2

STATE_NAMES = {
    resources_pb2.REPLICA_STATE_PENDING: "pending",
    resources_pb2.REPLICA_STATE_PULLING: "pulling",
    resources_pb2.REPLICA_STATE_STARTING: "starting",
    resources_pb2.REPLICA_STATE_READY: "ready",
    resources_pb2.REPLICA_STATE_FAILED: "failed",
}


def human_bytes(size: int) -> str:
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{size} B"
