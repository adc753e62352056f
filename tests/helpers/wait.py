"""Bounded waiting: every wait in the tests goes through here, so each has a timeout and names what it waited for."""

from __future__ import annotations

import asyncio
import inspect
import pathlib
import subprocess
import time
from collections.abc import Callable
from typing import Any


async def wait_for(check: Callable[[], Any], timeout: float = 5.0, what: str = "the condition",
                   interval: float = 0.05) -> Any:
    """The first truthy result of `check()` (plain or async), polled every `interval` s.

    AssertionError naming `what` (and the last result) once `timeout` s have passed without one.
    """
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {result!r})")
        await asyncio.sleep(interval)


def wait_for_sync(check: Callable[[], Any], timeout: float, what: str, interval: float = 0.2) -> Any:
    """`wait_for` for tests without an event loop (threads, `clowder up` clusters driven by the CLI)."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {result!r})")
        time.sleep(interval)


def wait_for_port_file(path: pathlib.Path, proc: subprocess.Popen, timeout: float) -> int:
    """The port a child process (`--port-file`) wrote once it listens; fails at once if the child exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"{proc.args!r} exited with {proc.returncode} before writing its port")
        if path.exists() and path.read_text().strip():
            return int(path.read_text())
        time.sleep(0.05)
    raise AssertionError(f"no port file after {timeout:.0f}s")
