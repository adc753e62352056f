"""`clowder up`: a whole cluster on this machine, supervised until Ctrl-C or `clowder down`."""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

from rich.console import Console
from rich.table import Table

from clowder_cli import paths
from clowder_cli.bundled import DEMO_ALIAS, DEMO_SLOTS, bundled_model_path
from clowder.client import Client
from clowder.storage.v1 import storage_pb2
from clowder_cli.control import open_control_plane
from clowder_cli.progress import show_pull
from clowder_cli.supervisor import STOPPED, STOPPING, Component, Supervisor
from clowder_common.auth import TOKEN_ENV, ensure_admin_token, token_path
from clowder_common.security import SERVICE_TOKEN_ENV, ensure_service_token
from clowder_common.errors import ClowderError, FailedPrecondition, NotFound, Unavailable
from clowder_common.etcd_server import start_etcd
from clowder_common.processes import (SUPERVISOR_ENV, become_subreaper, child_pids, free_port, pid_alive,
                                      port_open, spawn, stop_pids, terminate)

ETCD_PREFIX = "/clowder/"
# etcd, storage, controller and balancer each get this long to open their port.
START_TIMEOUT_S = 60
ETCD_START_TIMEOUT_S = 30
DEMO_READY_TIMEOUT_S = 300
# Runtimes left after the controller stopped (orphans) drain this long before SIGKILL.
RUNTIME_STOP_GRACE_S = 20


@dataclasses.dataclass(frozen=True)
class Ports:
    http: int
    grpc: int
    controller: int
    storage: int
    etcd: int
    etcd_peer: int

    @classmethod
    def choose(cls, http: int, internal: str) -> "Ports":
        if internal == "auto":
            return cls(http, free_port(), free_port(), free_port(), free_port(), free_port())
        base = int(internal)
        return cls(http, base, base + 1, base + 2, base + 3, base + 4)


class Stopped(Exception):
    """Ctrl-C or SIGTERM arrived while starting."""


class LocalCluster:
    """Starts etcd, storage, controller and balancer as supervised children; stops them (and runtimes) in reverse."""

    def __init__(self, data_dir: pathlib.Path, ports: Ports, console: Console) -> None:
        self.data_dir = data_dir
        self.ports = ports
        self.console = console
        self.logs = data_dir / "logs"
        self.supervisor = Supervisor(data_dir, console)
        self.token = ""
        self._stop_requested = False

    @property
    def children(self) -> list[tuple[str, subprocess.Popen]]:
        return [(c.name, c.proc) for c in self.supervisor.components if c.proc is not None]

    # -- signals ----------------------------------------------------------------

    def install_signal_handlers(self) -> None:
        def handler(signum, frame):
            if self._stop_requested:
                return
            self._stop_requested = True
            raise Stopped()

        signal.signal(signal.SIGINT, handler)
        signal.signal(signal.SIGTERM, handler)

    # -- start ------------------------------------------------------------------

    def start(self) -> None:
        busy = [p for p in dataclasses.astuple(self.ports) if port_open("127.0.0.1", p)]
        if busy:
            raise FailedPrecondition(f"port(s) {', '.join(map(str, busy))} already in use on 127.0.0.1; "
                                     "stop what uses them or choose other ports (--http-port, --internal-ports)")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.data_dir, 0o700)
        self.logs.mkdir(exist_ok=True)
        self.token = ensure_admin_token(self.data_dir)
        # One per cluster (0600 in the data dir): runtimes and storage take calls only from its holders.
        self.service_token = ensure_service_token(self.data_dir)
        self.console.print(f"[dim]data dir {self.data_dir}, logs in {self.logs}[/dim]")
        # Runtimes orphaned by a killed controller re-parent to us, so we can stop and reap them.
        if not become_subreaper():
            self.console.print("[yellow]cannot become a child subreaper; runtimes orphaned by a killed controller "
                               "are not stopped by `clowder down` (they still stop once `clowder up` exits)[/yellow]")

        etcd_endpoint = f"127.0.0.1:{self.ports.etcd}"

        def launch_etcd() -> subprocess.Popen:
            # Same ports and data dir on every restart: the cluster's state survives an etcd crash.
            # Blocks until its port opens (bounded): the supervisor's loop waits meanwhile; etcd with its data
            # dir kept opens its port within a second or two.
            return start_etcd(self.data_dir / "etcd", self.ports.etcd, self.ports.etcd_peer,
                              log_path=self.logs / "etcd.log", timeout=ETCD_START_TIMEOUT_S).proc

        self._start("etcd", self.ports.etcd, launch_etcd, grace=5)
        etcd_args = ["--etcd-endpoints", etcd_endpoint, "--etcd-prefix", ETCD_PREFIX]
        self._service("storage", self.ports.storage, [
            "-m", "clowder_storage", "--listen", f"127.0.0.1:{self.ports.storage}",
            "--data-dir", str(self.data_dir / "storage"), "--node-name", "local", *etcd_args])
        # The controller stops the runtimes it manages on SIGTERM: give it their drain time and more.
        self._service("controller", self.ports.controller, [
            "-m", "clowder_controller", "--listen", f"127.0.0.1:{self.ports.controller}",
            "--data-dir", str(self.data_dir / "controller"), *etcd_args], grace=30)
        self._service("balancer", self.ports.http, [
            "-m", "clowder_balancer", "--http-listen", f"127.0.0.1:{self.ports.http}",
            "--grpc-listen", f"127.0.0.1:{self.ports.grpc}",
            "--controller-address", f"127.0.0.1:{self.ports.controller}", *etcd_args])
        paths.write_cluster(self.data_dir, {
            "pid": os.getpid(),
            "controller": f"127.0.0.1:{self.ports.controller}",
            "storage": f"127.0.0.1:{self.ports.storage}",
            "balancer_http": f"http://127.0.0.1:{self.ports.http}",
            "balancer_grpc": f"127.0.0.1:{self.ports.grpc}",
            "etcd": etcd_endpoint,
        })
        # From here on a component that exits is restarted, also while the demo deploys.
        self.supervisor.start_loop()

    def _service(self, name: str, port: int, args: list[str], grace: float = 10) -> None:
        # Runtimes inherit CLOWDER_SUPERVISOR_PID from the controller and stop once we are gone.
        env = {TOKEN_ENV: self.token, SERVICE_TOKEN_ENV: self.service_token, SUPERVISOR_ENV: str(os.getpid())}

        def launch() -> subprocess.Popen:
            with open(self.logs / f"{name}.log", "ab") as log_file:
                return spawn([sys.executable, *args], log_file, env=env)

        self._start(name, port, launch, grace)

    def _start(self, name: str, port: int, launch, grace: float) -> None:
        component = Component(name, "127.0.0.1", port, launch, self.logs / f"{name}.log", stop_grace=grace,
                              start_timeout=START_TIMEOUT_S)
        try:
            self.supervisor.start_first(component)
        except (RuntimeError, TimeoutError, FailedPrecondition) as exc:
            raise FailedPrecondition(f"{name} did not start: {exc}; see {component.log_path}") from None
        self.console.print(f"{name:<11} 127.0.0.1:{port}")

    def control(self) -> Client:
        return open_control_plane(f"127.0.0.1:{self.ports.controller}", self.token)

    # -- run --------------------------------------------------------------------

    def wait(self) -> int:
        """Block until a stop is requested (Stopped is raised), or return 1 if the supervisor itself failed."""
        while self.supervisor.loop_alive:
            time.sleep(0.3)
        self.console.print(f"[red]the supervisor failed: {self.supervisor.error!r}; stopping the cluster[/red]")
        return 1

    def stop(self) -> None:
        """Balancer first (no new requests), controller (stops runtimes), left-over runtimes, storage, etcd."""
        # Further signals must not interrupt an orderly stop half-way.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        self.supervisor.stop_loop()
        components = {c.name: c for c in self.supervisor.components}
        for component in components.values():
            if component.proc is not None and component.proc.poll() is None:
                component.state = STOPPING
        if components:
            self.supervisor.write_state()

        def stop(name: str) -> None:
            component = components.get(name)
            if component is not None and component.proc is not None:
                component.last_exit_code = terminate(component.proc, grace=component.stop_grace)
                component.state = STOPPED
                component.started_at = None

        stop("balancer")
        stop("controller")
        # Runtimes the controller did not stop (orphaned by an earlier, killed controller) are our children.
        self._stop_strays(RUNTIME_STOP_GRACE_S)
        stop("storage")
        stop("etcd")
        self._stop_strays(2)
        paths.remove_cluster(self.data_dir)

    def _stop_strays(self, grace: float) -> None:
        known = [c.proc.pid for c in self.supervisor.components if c.proc is not None]
        strays = [pid for pid in child_pids() if pid not in known]
        if strays:
            left = stop_pids(strays, grace, keep=known)
            if left:
                self.console.print(f"[red]processes {left} did not stop[/red]")


def deploy_demo(control: Client, console: Console, http_port: int) -> None:
    """Add the bundled model as `smol`, pull it with a progress bar, run one replica, wait until it serves."""
    model = bundled_model_path()
    try:
        control.images.get(DEMO_ALIAS)
    except NotFound:
        control.images.create(DEMO_ALIAS, model.as_uri(), {"slots": DEMO_SLOTS})
    pull_with_retry(control, DEMO_ALIAS, console)
    try:
        control.deployments.get(DEMO_ALIAS)
    except NotFound:
        control.deployments.create(DEMO_ALIAS, DEMO_ALIAS, 1)
    deadline = time.monotonic() + DEMO_READY_TIMEOUT_S
    with console.status(f"starting {DEMO_ALIAS}"):
        while time.monotonic() < deadline:
            got = control.deployments.get(DEMO_ALIAS)
            if got.ready_replicas >= 1 or got.replicas == 0:
                break
            time.sleep(0.2)
        else:
            raise Unavailable(f"{DEMO_ALIAS} did not become ready in {DEMO_READY_TIMEOUT_S}s; see `clowder ps`")
    console.print(f"[green]ready:[/green] model [bold]{DEMO_ALIAS}[/bold] on http://127.0.0.1:{http_port}/v1")
    console.print(f"  curl http://127.0.0.1:{http_port}/v1/chat/completions -H 'Content-Type: application/json' "
                  f"-d '{{\"model\": \"{DEMO_ALIAS}\", \"messages\": [{{\"role\": \"user\", \"content\": \"Hi!\"}}]}}'",
                  soft_wrap=True, highlight=False)


# Unavailable reasons a pull outlasts: no storage node registered yet (it registers a moment after its port
# opens, and again after a restart), or the node went away mid-pull (`clowder up` restarts it). Failures of the
# source itself (SOURCE_UNAVAILABLE, SOURCE_TIMEOUT, ...) are the user's to see at once.
PULL_RETRY_REASONS = ("NO_NODES", "UNAVAILABLE")
PULL_RETRY_S = 60


def pull_with_retry(control: Client, alias: str, console: Console, node: str = "",
                    wait_s: float = PULL_RETRY_S) -> storage_pb2.Blob | None:
    """Pull with a progress bar; a storage node that is not there (yet, or any more) is waited for, bounded.

    A pull broken by a storage restart starts again once the node is back (the store verifies what it keeps).
    """
    deadline = None
    while True:
        try:
            return show_pull(alias, control.images.pull(alias, node), console)
        except Unavailable as err:
            if err.reason not in PULL_RETRY_REASONS:
                raise
            now = time.monotonic()
            deadline = deadline or now + wait_s
            if now > deadline:
                raise
            if err.reason != "NO_NODES":
                console.print(f"[yellow]pull {alias}: {err}; retrying[/yellow]", highlight=False)
            time.sleep(0.5)


def run_up(data_dir: pathlib.Path, http_port: int, internal_ports: str, demo: bool, console: Console) -> int:
    running = paths.read_cluster(data_dir)
    if running is not None:
        console.print(f"[red]a cluster is already running from {data_dir} (pid {running['pid']}); "
                      "`clowder down` stops it[/red]")
        return 1
    cluster = LocalCluster(data_dir, Ports.choose(http_port, internal_ports), console)
    cluster.install_signal_handlers()
    code = 0
    try:
        cluster.start()
        if demo:
            control = cluster.control()
            try:
                deploy_demo(control, console, http_port)
            finally:
                control.close()
        console.print(f"web console on http://127.0.0.1:{http_port}/console/ (sign in with the admin token: "
                      f"{TOKEN_ENV} or {token_path(data_dir)})", soft_wrap=True, highlight=False)
        console.print(f"cluster up; OpenAI API on http://127.0.0.1:{http_port}/v1 — Ctrl-C or `clowder down` stops it",
                      soft_wrap=True)
        code = cluster.wait()
    except Stopped:
        console.print("stopping")
    except (ClowderError, FileNotFoundError) as err:
        console.print(f"[red]error: {err}[/red]")
        code = 1
    finally:
        cluster.stop()
    console.print("cluster stopped")
    return code


# The slowest orderly stop: the supervisor's loop (30), balancer (10), controller (30), orphaned runtimes (20),
# storage (10), etcd (5), stragglers (2), each bounded.
DOWN_TIMEOUT_S = 120


def run_down(data_dir: pathlib.Path, console: Console, timeout: float = DOWN_TIMEOUT_S) -> int:
    # The supervisor's state file exists from the first component on: `down` also stops a cluster still starting.
    running = paths.read_cluster(data_dir) or paths.read_supervisor_state(data_dir)
    if running is None:
        console.print(f"no cluster is running from {data_dir}")
        return 0
    pid = int(running["pid"])
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not pid_alive(pid):
            console.print("cluster stopped")
            return 0
        time.sleep(0.2)
    console.print(f"[red]the cluster (pid {pid}) did not stop within {timeout:.0f}s[/red]")
    return 1


def run_status(data_dir: pathlib.Path, console: Console, as_json: bool = False) -> int:
    """`clowder status`: each component's state, pid, uptime and restarts, from the supervisor's state file."""
    state = paths.read_supervisor_state(data_dir)
    if state is None:
        if as_json:
            console.print_json(json.dumps({"running": False, "data_dir": str(data_dir)}))
        else:
            console.print(f"no cluster is running from {data_dir}; `clowder up` starts one")
        return 1
    now = time.time()
    for component in state["components"].values():
        started = component.get("started_at")
        component["uptime_s"] = round(now - started, 1) if started and component["state"] == "running" else None
    if as_json:
        console.print_json(json.dumps({"running": True, "data_dir": str(data_dir), **state}))
        return 0
    table = Table("COMPONENT", "STATE", "PID", "UPTIME", "RESTARTS", "LAST EXIT", "ADDRESS")
    colours = {"running": "green", "starting": "yellow", "backoff": "red"}
    for name, c in state["components"].items():
        colour = colours.get(c["state"], "white")
        table.add_row(name, f"[{colour}]{c['state']}[/{colour}]", str(c["pid"] or "-"),
                      _duration(c["uptime_s"]) if c["uptime_s"] is not None else "-", str(c["restarts"]),
                      "-" if c["last_exit_code"] is None else str(c["last_exit_code"]), c["address"])
    console.print(f"cluster from {data_dir} (supervisor pid {state['pid']})", highlight=False)
    console.print(table)
    return 0


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
