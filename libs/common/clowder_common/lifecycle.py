"""Process lifecycle: signals start one orderly, idempotent shutdown that drains before exit."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import signal
from typing import Awaitable, Callable

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1


class Lifecycle:
    """Collects shutdown hooks and runs them once, newest first, each bounded in time."""

    def __init__(self, hook_timeout: float = 30.0) -> None:
        self.stopping = asyncio.Event()
        self._hooks: list[tuple[str, Callable[[], Awaitable[None]]]] = []
        self._hook_timeout = hook_timeout
        self._shutdown_task: asyncio.Task | None = None

    def on_shutdown(self, name: str, hook: Callable[[], Awaitable[None]]) -> None:
        self._hooks.append((name, hook))

    def install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop, sig)

    def request_stop(self, sig: int | None = None) -> None:
        if not self.stopping.is_set():
            log.info("stopping%s", f" on {signal.Signals(sig).name}" if sig else "")
        self.stopping.set()

    async def wait(self) -> None:
        await self.stopping.wait()

    async def shutdown(self) -> None:
        """Safe to call more than once and from several tasks: the hooks run once."""
        self.stopping.set()
        if self._shutdown_task is None:
            self._shutdown_task = asyncio.ensure_future(self._run_hooks())
        await asyncio.shield(self._shutdown_task)

    async def _run_hooks(self) -> None:
        for name, hook in reversed(self._hooks):
            try:
                await asyncio.wait_for(hook(), self._hook_timeout)
            except asyncio.TimeoutError:
                log.warning("shutdown step %s took longer than %.0fs; moving on", name, self._hook_timeout)
            except Exception:
                log.exception("shutdown step %s failed", name)


def die_with_parent() -> None:
    """Ask Linux to SIGTERM us when the process that started us exits.

    `clowder up` and the controller's launcher set CLOWDER_PARENT_PID; a
    supervisor killed with SIGKILL then leaves no orphan serving stale state.
    """
    parent = os.environ.get("CLOWDER_PARENT_PID")
    if not parent:
        return
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    # The parent may have died before prctl took effect.
    if os.getppid() != int(parent):
        os.kill(os.getpid(), signal.SIGTERM)


async def serve_until_stopped(start: Callable[[Lifecycle], Awaitable[None]]) -> None:
    """Run a service: `start` builds it and registers hooks; a signal drains and exits."""
    lifecycle = Lifecycle()
    lifecycle.install_signal_handlers()
    try:
        await start(lifecycle)
        await lifecycle.wait()
    finally:
        await lifecycle.shutdown()
