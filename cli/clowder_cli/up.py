"""`clowder up`: a whole cluster on this machine, supervised until Ctrl-C or `clowder down`."""

from __future__ import annotations

import dataclasses
import os
import pathlib
import signal
import subprocess
import sys
import time

from rich.console import Console

from clowder_cli import paths
from clowder_cli.bundled import DEMO_ALIAS, bundled_model_path
from clowder.client import Client
from clowder_cli.control import open_control_plane
from clowder_cli.progress import show_pull
from clowder_common.auth import TOKEN_ENV, ensure_admin_token
from clowder_common.errors import ClowderError, FailedPrecondition, NotFound, Unavailable
from clowder_common.etcd_server import EtcdProcess, start_etcd
from clowder_common.processes import free_port, port_open, spawn, terminate, wait_for_port

ETCD_PREFIX = "/clowder/"
# etcd, storage, controller and balancer each get this long to open their port.
START_TIMEOUT_S = 60
DEMO_READY_TIMEOUT_S = 300


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
    """Starts etcd, storage, controller and balancer as child processes; stops them in reverse."""

    def __init__(self, data_dir: pathlib.Path, ports: Ports, console: Console) -> None:
        self.data_dir = data_dir
        self.ports = ports
        self.console = console
        self.logs = data_dir / "logs"
        self.etcd: EtcdProcess | None = None
        self.children: list[tuple[str, subprocess.Popen]] = []
        self.token = ""
        self._stop_requested = False

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
        self.console.print(f"[dim]data dir {self.data_dir}, logs in {self.logs}[/dim]")

        self.etcd = start_etcd(self.data_dir / "etcd", self.ports.etcd, self.ports.etcd_peer,
                               log_path=self.logs / "etcd.log", timeout=START_TIMEOUT_S)
        self.console.print(f"etcd        127.0.0.1:{self.ports.etcd}")
        etcd_args = ["--etcd-endpoints", self.etcd.endpoint, "--etcd-prefix", ETCD_PREFIX]
        self._service("storage", self.ports.storage, [
            "-m", "clowder_storage", "--listen", f"127.0.0.1:{self.ports.storage}",
            "--data-dir", str(self.data_dir / "storage"), "--node-name", "local", *etcd_args])
        self._service("controller", self.ports.controller, [
            "-m", "clowder_controller", "--listen", f"127.0.0.1:{self.ports.controller}",
            "--data-dir", str(self.data_dir / "controller"), *etcd_args])
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
            "etcd": self.etcd.endpoint,
        })

    def _service(self, name: str, port: int, args: list[str]) -> None:
        with open(self.logs / f"{name}.log", "ab") as log_file:
            proc = spawn([sys.executable, *args], log_file, env={TOKEN_ENV: self.token})
        self.children.append((name, proc))
        try:
            wait_for_port("127.0.0.1", port, START_TIMEOUT_S, proc)
        except (RuntimeError, TimeoutError) as exc:
            raise FailedPrecondition(f"{name} did not start: {exc}; see {self.logs / (name + '.log')}") from None
        self.console.print(f"{name:<11} 127.0.0.1:{port}")

    def control(self) -> Client:
        return open_control_plane(f"127.0.0.1:{self.ports.controller}", self.token)

    # -- run --------------------------------------------------------------------

    def wait(self) -> int:
        """Block until a stop is requested (0) or a service dies (1)."""
        while True:
            for name, proc in self.children:
                if proc.poll() is not None:
                    self.console.print(f"[red]{name} exited with code {proc.returncode}; stopping the cluster "
                                       f"(see {self.logs / (name + '.log')})[/red]")
                    return 1
            if self.etcd is not None and self.etcd.proc.poll() is not None:
                self.console.print("[red]etcd exited; stopping the cluster[/red]")
                return 1
            time.sleep(0.3)

    def stop(self) -> None:
        """Balancer first (no new requests), then controller (stops runtimes), storage, etcd."""
        # Further signals must not interrupt an orderly stop half-way.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        for name, proc in reversed(self.children):
            terminate(proc, grace=30 if name == "controller" else 10)
        if self.etcd is not None:
            self.etcd.stop()
        paths.remove_cluster(self.data_dir)


def deploy_demo(control: Client, console: Console, http_port: int) -> None:
    """Add the bundled model as `smol`, pull it with a progress bar, run one replica, wait until it serves."""
    model = bundled_model_path()
    try:
        control.images.get(DEMO_ALIAS)
    except NotFound:
        control.images.create(DEMO_ALIAS, model.as_uri())
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


def pull_with_retry(control: Client, alias: str, console: Console, wait_for_node_s: float = 30) -> None:
    """The storage node registers a moment after its port opens; wait for it instead of failing."""
    deadline = time.monotonic() + wait_for_node_s
    while True:
        try:
            show_pull(alias, control.images.pull(alias), console)
            return
        except Unavailable as err:
            if err.reason != "NO_NODES" or time.monotonic() > deadline:
                raise
            time.sleep(0.2)


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


def run_down(data_dir: pathlib.Path, console: Console, timeout: float = 90) -> int:
    running = paths.read_cluster(data_dir)
    if running is None:
        console.print(f"no cluster is running from {data_dir}")
        return 0
    pid = int(running["pid"])
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if paths.read_cluster(data_dir) is None:
            console.print("cluster stopped")
            return 0
        time.sleep(0.2)
    console.print(f"[red]the cluster (pid {pid}) did not stop within {timeout:.0f}s[/red]")
    return 1
