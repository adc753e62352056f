"""`clowder up` as a user runs it, its console captured: shared by the e2e and supervisor fault tests."""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

from clowder.client import Client
from clowder.controller.v1 import resources_pb2
from clowder_cli.control import open_control_plane
from clowder_common.auth import read_admin_token
from clowder_common.errors import ClowderError
from clowder_common.processes import free_port
from clowder_common.security import SERVICE_TOKEN_ENV, ClusterSecurity, service_token_path

CLOWDER = [sys.executable, "-m", "clowder_cli.main"]


class UpCluster:
    """`clowder up` (with --demo unless told otherwise) on its own data dir; its console is kept line by line."""

    def __init__(self, data_dir: pathlib.Path, http_port: int, demo: bool = True, wide_console: bool = True) -> None:
        self.data_dir = data_dir
        self.http_port = http_port
        self.output: list[str] = []
        self.env = dict(os.environ)
        self.env.pop("CLOWDER_ADMIN_TOKEN", None)  # exercise the generated, stored token
        self.env.pop(SERVICE_TOKEN_ENV, None)  # and the generated service credential
        # The CLI's tables are read at 200 columns; wide_console gives `clowder up`'s own console that width too.
        up_env = {**self.env, "COLUMNS": "200"} if wide_console else self.env
        self.proc = subprocess.Popen(
            [*CLOWDER, "--data-dir", str(data_dir), "up", *(["--demo"] if demo else []), "--http-port",
             str(http_port), "--internal-ports", "auto"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True, env=up_env)
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.output.append(line.rstrip("\n"))

    @property
    def text(self) -> str:
        return "\n".join(self.output)

    def wait_for(self, text: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in self.text:
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.1)
        raise AssertionError(f"{text!r} not printed; output so far:\n{self.text}")

    def cli(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([*CLOWDER, "--data-dir", str(self.data_dir), *args], capture_output=True, text=True,
                              timeout=90, env={**self.env, "COLUMNS": "200"})

    def control(self) -> Client:
        info = json.loads((self.data_dir / "cluster.json").read_text())
        return open_control_plane(info["controller"], read_admin_token(self.data_dir))

    def security(self) -> ClusterSecurity:
        """How a test calls a runtime or storage of this cluster directly: as a component, with the service
        credential `clowder up` generated (data dir, mode 0600)."""
        path = service_token_path(self.data_dir)
        assert path.stat().st_mode & 0o777 == 0o600
        return ClusterSecurity(path.read_text().strip())

    def state(self) -> dict:
        return json.loads((self.data_dir / "supervisor.json").read_text())

    def component(self, name: str) -> dict:
        return self.state()["components"][name]

    def wait_component(self, name: str, check, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        got = None
        while time.monotonic() < deadline:
            got = self.component(name)
            if check(got):
                return got
            time.sleep(0.1)
        raise AssertionError(f"{name} is {got}; output:\n{self.text}")

    def wait_log(self, log: str, text: str, timeout: float) -> None:
        path = self.data_dir / "logs" / log
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in path.read_text(errors="replace"):
                return
            time.sleep(0.2)
        raise AssertionError(f"{text!r} not in {path}")


def smol_replica(cluster: UpCluster, timeout: float = 60) -> resources_pb2.Replica:
    """smol's one replica once it is ready (the controller may be restarting: retried, bounded)."""
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        control = cluster.control()
        try:
            replicas = list(control.deployments.replicas("smol"))
            if len(replicas) == 1 and replicas[0].state == resources_pb2.REPLICA_STATE_READY:
                return replicas[0]
            last = replicas
        except ClowderError as err:
            last = err
        finally:
            control.close()
        time.sleep(0.3)
    raise AssertionError(f"smol has no ready replica: {last}")


@contextlib.contextmanager
def up_cluster(data_dir: pathlib.Path, **options) -> Iterator[UpCluster]:
    """An UpCluster on a free port once it printed "cluster up"; terminated afterwards unless a test stopped it."""
    cluster = UpCluster(data_dir, free_port(), **options)
    try:
        cluster.wait_for("cluster up", timeout=300)
        yield cluster
    finally:
        if cluster.proc.poll() is None:
            cluster.proc.terminate()
            cluster.proc.wait(120)
