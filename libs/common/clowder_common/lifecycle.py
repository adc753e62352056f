"""Process lifecycle: signals start one orderly, idempotent shutdown that drains before exit."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import signal
import threading
import time
from typing import Awaitable, Callable

from clowder_common.processes import PARENT_ENV, SUPERVISOR_ENV, pid_alive, process_start_time

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1
# How often a process checks that its supervisor (`clowder up`) still runs, and how long after asking itself
# to stop (SIGTERM: an orderly drain) it waits before SIGKILL.
SUPERVISOR_POLL_S = 1.0
SUPERVISOR_GONE_KILL_S = 60.0


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
    """Ask Linux to SIGTERM us when the process that started us exits; and stop when `clowder up` is gone.

    `clowder up` sets CLOWDER_PARENT_PID for its direct children (etcd, storage, controller, balancer): a
    supervisor killed with SIGKILL then leaves no orphan serving stale state. Runtimes are started without
    it (they must outlive a killed controller) and rely on the supervisor watch alone.
    """
    watch_supervisor()
    parent = os.environ.get(PARENT_ENV)
    if not parent:
        return
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    # The parent may have died before prctl took effect.
    if os.getppid() != int(parent):
        os.kill(os.getpid(), signal.SIGTERM)


def watch_supervisor(poll_s: float = SUPERVISOR_POLL_S) -> threading.Thread | None:
    """When CLOWDER_SUPERVISOR_PID is set, SIGTERM ourselves once that process is gone.

    PDEATHSIG cannot express this for a runtime: its parent is the controller, which it must outlive, and
    Linux fires PDEATHSIG when that parent dies. So the runtime polls the supervisor's pid instead (start
    time compared too, against pid reuse). SIGTERM starts the usual drain; SIGKILL follows if that hangs.
    """
    raw = os.environ.get(SUPERVISOR_ENV, "")
    if not raw.isdigit():
        return None
    pid = int(raw)
    born = process_start_time(pid)

    def gone() -> bool:
        return born is None or not pid_alive(pid) or process_start_time(pid) != born

    def watch() -> None:
        while not gone():
            time.sleep(poll_s)
        log.warning("supervisor (pid %d) is gone; stopping", pid)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(SUPERVISOR_GONE_KILL_S)
        os.kill(os.getpid(), signal.SIGKILL)

    thread = threading.Thread(target=watch, name="supervisor-watch", daemon=True)
    thread.start()
    return thread


async def serve_until_stopped(start: Callable[[Lifecycle], Awaitable[None]]) -> None:
    """Run a service: `start` builds it and registers hooks; a signal drains and exits."""
    lifecycle = Lifecycle()
    lifecycle.install_signal_handlers()
    try:
        await start(lifecycle)
        await lifecycle.wait()
    finally:
        await lifecycle.shutdown()
