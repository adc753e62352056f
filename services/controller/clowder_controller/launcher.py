"""Launchers start and stop runtimes; the local one runs them as processes on this machine."""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import logging
import os
import pathlib
import signal
import subprocess
import sys
from typing import Protocol

from google.protobuf import json_format

from clowder.controller.v1 import resources_pb2
from clowder_common.auth import TOKEN_ENV
from clowder_common.processes import pid_alive, spawn

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class RuntimeSpec:
    """Everything a runtime needs to serve one replica."""

    deployment: str
    replica_id: str
    node: str
    digest: str
    storage_address: str
    configuration: resources_pb2.ImageConfiguration
    threads: int


class RuntimeState(enum.Enum):
    RUNNING = "running"
    EXITED = "exited"


@dataclasses.dataclass(frozen=True)
class RuntimeStatus:
    state: RuntimeState
    exit_code: int | None = None


class Launcher(Protocol):
    async def start(self, spec: RuntimeSpec) -> int:
        """Start the runtime; returns its process id (or another handle id)."""

    def status(self, replica: resources_pb2.Replica) -> RuntimeStatus: ...

    async def stop(self, replica: resources_pb2.Replica, grace: float) -> None: ...

    async def stop_all(self, grace: float) -> None: ...


class LocalProcessLauncher:
    """Runtimes as child processes of the controller (the embedded, one-machine engine).

    Children die with the controller (PDEATHSIG), so a killed controller leaves
    no runtime behind; a replica's pid is kept in etcd so status still works for
    a process this controller did not start itself.
    """

    def __init__(self, etcd_endpoints: tuple[str, ...], etcd_prefix: str, listen: str, log_dir: pathlib.Path,
                 admin_token: str | None) -> None:
        self._etcd_endpoints = etcd_endpoints
        self._etcd_prefix = etcd_prefix
        self._listen = listen
        self._log_dir = log_dir
        self._admin_token = admin_token
        self._children: dict[str, subprocess.Popen] = {}

    def log_path(self, deployment: str, replica_id: str) -> pathlib.Path:
        return self._log_dir / f"runtime-{deployment}-{replica_id}.log"

    def _argv(self, spec: RuntimeSpec) -> list[str]:
        return [
            sys.executable, "-m", "clowder_runtime",
            "--deployment", spec.deployment,
            "--replica-id", spec.replica_id,
            "--node", spec.node,
            "--digest", spec.digest,
            "--storage", spec.storage_address,
            "--listen", self._listen,
            "--threads", str(spec.threads),
            "--etcd-endpoints", ",".join(self._etcd_endpoints),
            "--etcd-prefix", self._etcd_prefix,
            "--image-config", json_format.MessageToJson(spec.configuration, indent=None),
        ]

    async def start(self, spec: RuntimeSpec) -> int:
        self._log_dir.mkdir(parents=True, exist_ok=True)
        old = self._children.pop(spec.replica_id, None)
        if old is not None and old.poll() is None:
            old.kill()
            old.wait()
        env = {TOKEN_ENV: self._admin_token} if self._admin_token else {}
        with open(self.log_path(spec.deployment, spec.replica_id), "ab") as log_file:
            proc = spawn(self._argv(spec), log_file, env=env)
        self._children[spec.replica_id] = proc
        log.info("started runtime %s/%s as pid %d", spec.deployment, spec.replica_id, proc.pid)
        return proc.pid

    def status(self, replica: resources_pb2.Replica) -> RuntimeStatus:
        proc = self._children.get(replica.id)
        if proc is not None:
            code = proc.poll()
            return RuntimeStatus(RuntimeState.RUNNING) if code is None else RuntimeStatus(RuntimeState.EXITED, code)
        # Started by an earlier controller: trust the pid only if it still runs this replica.
        if replica.pid and pid_alive(replica.pid) and _runs_replica(replica.pid, replica.id):
            return RuntimeStatus(RuntimeState.RUNNING)
        return RuntimeStatus(RuntimeState.EXITED)

    async def stop(self, replica: resources_pb2.Replica, grace: float) -> None:
        proc = self._children.pop(replica.id, None)
        pid = proc.pid if proc is not None else replica.pid
        if proc is None and not (pid and pid_alive(pid) and _runs_replica(pid, replica.id)):
            return
        await _terminate(pid, proc, grace)
        log.info("stopped runtime %s/%s (pid %d)", replica.deployment, replica.id, pid)

    async def stop_all(self, grace: float) -> None:
        children, self._children = self._children, {}
        await asyncio.gather(*(_terminate(p.pid, p, grace) for p in children.values()))


def _runs_replica(pid: int, replica_id: str) -> bool:
    try:
        cmdline = pathlib.Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return b"clowder_runtime" in cmdline and replica_id.encode() in cmdline


async def _terminate(pid: int, proc: subprocess.Popen | None, grace: float) -> None:
    """SIGTERM (the runtime drains), then SIGKILL after `grace`; never blocks the event loop."""

    def exited() -> bool:
        return proc.poll() is not None if proc is not None else not pid_alive(pid)

    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        exited()
        return
    loop = asyncio.get_running_loop()
    deadline = loop.time() + grace
    while loop.time() < deadline:
        if exited():
            return
        await asyncio.sleep(0.1)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    for _ in range(50):
        if exited():
            return
        await asyncio.sleep(0.1)
