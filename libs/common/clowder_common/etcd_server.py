"""Start a private etcd on loopback: the embedded cluster's state store, and the tests' (one member or several)."""

from __future__ import annotations

import dataclasses
import pathlib
import shutil
import signal
import subprocess
import time
import urllib.request

from clowder_common.errors import FailedPrecondition
from clowder_common.processes import free_port, port_open, spawn, terminate


@dataclasses.dataclass
class EtcdProcess:
    proc: subprocess.Popen
    client_port: int
    data_dir: pathlib.Path
    # What started it, so restart() brings the same member back with its data.
    argv: list[str] = dataclasses.field(default_factory=list)
    log_path: pathlib.Path | None = None

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.client_port}"

    def stop(self) -> None:
        terminate(self.proc, grace=5)

    def kill(self) -> None:
        """SIGKILL, as a crash: no clean shutdown, the data directory stays as it was."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)

    def pause(self) -> None:
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        self.proc.send_signal(signal.SIGCONT)

    def restart(self, timeout: float = 20.0) -> None:
        """Start this member again on the same ports and data directory (after stop() or kill())."""
        if self.proc.poll() is None:
            self.stop()
        self.proc = _spawn(self.argv, self.log_path)
        _wait_port(self.proc, self.client_port, timeout, self.log_path)


def _binary() -> str:
    binary = shutil.which("etcd")
    if binary is None:
        raise FailedPrecondition("the etcd binary is not installed (Debian: apt-get install etcd-server)")
    return binary


def _spawn(argv: list[str], log_path: pathlib.Path | None) -> subprocess.Popen:
    log_file = open(log_path, "ab") if log_path else None
    try:
        return spawn(argv, log_file)
    finally:
        if log_file is not None:
            log_file.close()


def _wait_port(proc: subprocess.Popen, client_port: int, timeout: float, log_path: pathlib.Path | None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise FailedPrecondition(f"etcd exited with code {proc.returncode}; see {log_path or 'its output'}")
        if port_open("127.0.0.1", client_port):
            return
        time.sleep(0.05)
    terminate(proc)
    raise FailedPrecondition(f"etcd did not open 127.0.0.1:{client_port} within {timeout:.0f}s")


def _member_argv(name: str, data_dir: pathlib.Path, client_port: int, peer_port: int, initial_cluster: str,
                 token: str) -> list[str]:
    client_url = f"http://127.0.0.1:{client_port}"
    peer_url = f"http://127.0.0.1:{peer_port}"
    return [
        _binary(),
        "--name", name,
        "--data-dir", str(data_dir),
        "--listen-client-urls", client_url,
        "--advertise-client-urls", client_url,
        "--listen-peer-urls", peer_url,
        "--initial-advertise-peer-urls", peer_url,
        "--initial-cluster", initial_cluster,
        "--initial-cluster-token", token,
        "--logger=zap",
        "--log-level=warn",
    ]


def start_etcd(data_dir: pathlib.Path, client_port: int | None = None, peer_port: int | None = None,
               log_path: pathlib.Path | None = None, timeout: float = 20.0) -> EtcdProcess:
    client_port = client_port or free_port()
    peer_port = peer_port or free_port()
    data_dir.mkdir(parents=True, exist_ok=True)
    argv = _member_argv("clowder", data_dir, client_port, peer_port,
                        f"clowder=http://127.0.0.1:{peer_port}", "clowder")
    proc = _spawn(argv, log_path)
    _wait_port(proc, client_port, timeout, log_path)
    return EtcdProcess(proc, client_port, data_dir, argv, log_path)


@dataclasses.dataclass
class EtcdCluster:
    members: list[EtcdProcess]

    @property
    def endpoints(self) -> list[str]:
        return [m.endpoint for m in self.members]

    def stop(self) -> None:
        for member in self.members:
            member.stop()


def member_healthy(member: EtcdProcess, timeout: float = 1.0) -> bool:
    """etcd's /health: true once the member is part of a cluster with a leader."""
    try:
        with urllib.request.urlopen(f"http://{member.endpoint}/health", timeout=timeout) as reply:
            return b'"true"' in reply.read()
    except OSError:
        return False


def start_etcd_cluster(base_dir: pathlib.Path, size: int = 3, timeout: float = 30.0) -> EtcdCluster:
    """`size` members on loopback, each with its own data directory and log (base_dir/m<i>, base_dir/m<i>.log)."""
    base_dir.mkdir(parents=True, exist_ok=True)
    ports = [(free_port(), free_port()) for _ in range(size)]
    initial = ",".join(f"m{i}=http://127.0.0.1:{peer}" for i, (_, peer) in enumerate(ports))
    token = f"clowder-{base_dir.name}"
    members: list[EtcdProcess] = []
    try:
        for i, (client_port, peer_port) in enumerate(ports):
            data_dir = base_dir / f"m{i}"
            data_dir.mkdir(parents=True, exist_ok=True)
            log_path = base_dir / f"m{i}.log"
            argv = _member_argv(f"m{i}", data_dir, client_port, peer_port, initial, token)
            members.append(EtcdProcess(_spawn(argv, log_path), client_port, data_dir, argv, log_path))
        for member in members:
            _wait_port(member.proc, member.client_port, timeout, member.log_path)
        deadline = time.monotonic() + timeout
        while not all(member_healthy(m) for m in members):
            if time.monotonic() > deadline:
                raise FailedPrecondition(f"the etcd cluster in {base_dir} had no leader within {timeout:.0f}s")
            time.sleep(0.1)
    except BaseException:
        for member in members:
            member.stop()
        raise
    return EtcdCluster(members)
