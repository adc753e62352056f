"""Start a private etcd on loopback: the embedded cluster's state store, and the tests'."""

from __future__ import annotations

import dataclasses
import pathlib
import shutil
import subprocess
import time

from clowder_common.errors import FailedPrecondition
from clowder_common.processes import free_port, port_open, spawn, terminate


@dataclasses.dataclass
class EtcdProcess:
    proc: subprocess.Popen
    client_port: int
    data_dir: pathlib.Path

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.client_port}"

    def stop(self) -> None:
        terminate(self.proc, grace=5)


def start_etcd(data_dir: pathlib.Path, client_port: int | None = None, peer_port: int | None = None,
               log_path: pathlib.Path | None = None, timeout: float = 20.0) -> EtcdProcess:
    binary = shutil.which("etcd")
    if binary is None:
        raise FailedPrecondition("the etcd binary is not installed (Debian: apt-get install etcd-server)")
    client_port = client_port or free_port()
    peer_port = peer_port or free_port()
    data_dir.mkdir(parents=True, exist_ok=True)
    client_url = f"http://127.0.0.1:{client_port}"
    peer_url = f"http://127.0.0.1:{peer_port}"
    argv = [
        binary,
        "--name", "clowder",
        "--data-dir", str(data_dir),
        "--listen-client-urls", client_url,
        "--advertise-client-urls", client_url,
        "--listen-peer-urls", peer_url,
        "--initial-advertise-peer-urls", peer_url,
        "--initial-cluster", f"clowder={peer_url}",
        "--logger=zap",
        "--log-level=warn",
    ]
    log_file = open(log_path, "ab") if log_path else None
    try:
        proc = spawn(argv, log_file)
    finally:
        if log_file is not None:
            log_file.close()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise FailedPrecondition(f"etcd exited with code {proc.returncode}; see {log_path or 'its output'}")
        if port_open("127.0.0.1", client_port):
            return EtcdProcess(proc, client_port, data_dir)
        time.sleep(0.05)
    terminate(proc)
    raise FailedPrecondition(f"etcd did not open 127.0.0.1:{client_port} within {timeout:.0f}s")
