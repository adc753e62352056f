"""The supervisor behind `clowder up`: restarts any component that exits, with backoff, while the others serve.

Each component (etcd, storage, controller, balancer) is one child process. When it exits the supervisor logs
it, waits a backoff (0.5 s doubling to 10 s; back to 0.5 s once a run lasted STABLE_S) and starts it again
with the same arguments: same ports, same data dirs (etcd keeps its data). Its state is written atomically
to <data dir>/supervisor.json whenever it changes; `clowder status` reads that file.

The state file (paths.SUPERVISOR_FILE; paths.read_supervisor_state() returns it only while its pid runs):

    {"pid": <clowder up>, "updated_at": <unix s>,
     "components": {"etcd" | "storage" | "controller" | "balancer": {
         "state": "starting" | "running" | "backoff" | "stopping" | "stopped",
         "pid": <int, or null while not running>, "address": "127.0.0.1:<port>",
         "started_at": <unix s of the current run, or null>, "restarts": <int>,
         "last_exit_code": <int (negative: the signal), or null>, "next_start_at": <unix s while in backoff>,
         "log": "<data dir>/logs/<name>.log"}}}

`clowder status --json` prints the same plus "running": true, "data_dir" and each component's "uptime_s".

`clowder up` is also a child subreaper: runtimes orphaned by a killed controller re-parent to it, so it
reaps them when they exit and stops them with the cluster.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import subprocess
import threading
import time
from typing import Callable

from rich.console import Console

from clowder_cli import paths
from clowder_common.processes import port_open, reap_children, terminate, wait_for_port

MIN_BACKOFF_S = 0.5
MAX_BACKOFF_S = 10.0
# A run at least this long counts as healthy: the next crash restarts after MIN_BACKOFF_S again.
STABLE_S = 30.0
POLL_S = 0.2

STARTING = "starting"  # launched, its port not open yet
RUNNING = "running"
BACKOFF = "backoff"  # exited; restarts at next_start_at
STOPPING = "stopping"
STOPPED = "stopped"


@dataclasses.dataclass
class Component:
    """One supervised child: how to launch it, where it listens, and what happened to it so far."""

    name: str
    host: str
    port: int
    # Starts the process without waiting for its port (etcd's launcher waits; it opens its port at once).
    launch: Callable[[], subprocess.Popen]
    log_path: pathlib.Path
    # How long a graceful stop may take before SIGKILL.
    stop_grace: float = 10.0
    start_timeout: float = 60.0
    proc: subprocess.Popen | None = None
    state: str = STOPPED
    started_at: float | None = None  # wall clock, for uptime shown by `clowder status`
    restarts: int = 0
    last_exit_code: int | None = None
    backoff_s: float = MIN_BACKOFF_S
    next_start_at: float | None = None  # wall clock, while in backoff
    _started_mono: float = 0.0
    _next_start_mono: float = 0.0

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None and self.proc.poll() is None else None

    def snapshot(self) -> dict:
        return {
            "state": self.state,
            "pid": self.pid,
            "address": self.address,
            "started_at": self.started_at,
            "restarts": self.restarts,
            "last_exit_code": self.last_exit_code,
            "next_start_at": self.next_start_at if self.state == BACKOFF else None,
            "log": str(self.log_path),
        }


class Supervisor:
    """Owns the components once they are started; check_once() is one step of the restart loop."""

    def __init__(self, data_dir: pathlib.Path, console: Console) -> None:
        self.data_dir = data_dir
        self.console = console
        self.components: list[Component] = []
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self.error: BaseException | None = None

    # -- first start (blocking; a failure here aborts `clowder up`) ----------------------------

    def start_first(self, component: Component) -> None:
        """Launch and wait for the port; raises RuntimeError/TimeoutError when it does not come up."""
        self.components.append(component)
        self._launch(component)
        wait_for_port(component.host, component.port, component.start_timeout, component.proc)
        component.state = RUNNING
        self.write_state()

    def _launch(self, component: Component) -> None:
        component.proc = component.launch()
        component.state = STARTING
        component.started_at = time.time()
        component._started_mono = time.monotonic()
        component.next_start_at = None

    # -- the loop -------------------------------------------------------------------------------

    def start_loop(self) -> None:
        self._thread = threading.Thread(target=self._run, name="supervisor", daemon=True)
        self._thread.start()

    def stop_loop(self, timeout: float = 30.0) -> None:
        """Stop restarting; waits for a restart in progress (bounded)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def loop_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                self.check_once()
                self._stop.wait(POLL_S)
        except BaseException as exc:  # reported by LocalCluster.wait(), which then stops the cluster
            self.error = exc
            raise

    def check_once(self) -> None:
        changed = False
        for component in self.components:
            if self._stop.is_set():
                break
            changed |= self._step(component)
        # Runtimes orphaned by a killed controller are our children now: collect them when they exit.
        reap_children(keep=[c.proc.pid for c in self.components if c.proc is not None])
        if changed:
            self.write_state()

    def _step(self, c: Component) -> bool:
        now = time.monotonic()
        if c.state in (STARTING, RUNNING):
            assert c.proc is not None
            code = c.proc.poll()
            if code is not None:
                self._exited(c, code, now)
                return True
            if c.state == STARTING:
                if port_open(c.host, c.port):
                    c.state = RUNNING
                    self.console.print(f"[green]{c.name} restarted[/green] (pid {c.proc.pid}, "
                                       f"restart {c.restarts})")
                    return True
                if now - c._started_mono > c.start_timeout:
                    self.console.print(f"[red]{c.name} did not open {c.address} within {c.start_timeout:.0f}s; "
                                       "killing it[/red]")
                    terminate(c.proc, grace=5)  # the next step sees the exit and backs off
            return False
        if c.state == BACKOFF and now >= c._next_start_mono:
            c.restarts += 1
            try:
                self._launch(c)
            except Exception as exc:  # e.g. etcd did not open its port: try again later
                self.console.print(f"[red]{c.name} failed to start: {exc}[/red]")
                self._exited(c, None, time.monotonic())
            return True
        return False

    def _exited(self, c: Component, code: int | None, now: float) -> None:
        ran = now - c._started_mono
        if ran >= STABLE_S:
            c.backoff_s = MIN_BACKOFF_S
        delay = c.backoff_s
        c.backoff_s = min(c.backoff_s * 2, MAX_BACKOFF_S)
        c.last_exit_code = code
        c.state = BACKOFF
        c.started_at = None
        c._next_start_mono = now + delay
        c.next_start_at = time.time() + delay
        self.console.print(f"[yellow]{c.name} exited with code {code} after {ran:.1f}s; restarting in {delay:.1f}s "
                           f"(see {c.log_path})[/yellow]")

    # -- state file -----------------------------------------------------------------------------

    def write_state(self) -> None:
        paths.write_supervisor_state(self.data_dir, self.state())

    def state(self) -> dict:
        return {
            "pid": os.getpid(),
            "updated_at": time.time(),
            "components": {c.name: c.snapshot() for c in self.components},
        }
