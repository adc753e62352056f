"""The CLI's handle on the control plane: the Python SDK's client, and readable errors."""

from __future__ import annotations

from clowder.client import Client
from clowder_common.errors import ClowderError

CALL_DEADLINE_S = 15


def open_control_plane(address: str, token: str | None) -> Client:
    """The SDK client the CLI commands use; deadlines, retries of reads and error decoding come with it."""
    return Client(controller=address, admin_token=token, timeout_s=CALL_DEADLINE_S)


def describe(error: ClowderError) -> str:
    """One readable paragraph: code, message, then each bad field."""
    lines = [f"{error.code.name}: {error.message}"]
    lines += [f"  {v.field}: {v.description}" for v in error.violations if v.description != error.message]
    return "\n".join(lines)
