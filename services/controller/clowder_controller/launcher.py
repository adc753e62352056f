"""Launchers start and stop runtimes; the local one runs them as processes on this machine."""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import logging
import os
import pathlib
import shlex
import shutil
import signal
import subprocess
import sys
from typing import Mapping, Protocol

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
    # Resolved from the deployment, the aimage and the controller's defaults; 0: the runtime's default.
    slots: int = 0
    context_size: int = 0
    batch_size: int = 0
    # The node's CPUs when no setting fixes the threads: the runtime then follows the number of runtimes on
    # the node (threads above is only its start value). 0: threads are fixed.
    node_cpus: int = 0

    def settings_args(self) -> list[str]:
        """Runtime flags for the settings that are set (explicit flags win over --image-config's values)."""
        args = ["--threads", str(self.threads)]
        if self.node_cpus:
            args += ["--node-cpus", str(self.node_cpus)]
        for flag, value in (("--slots", self.slots), ("--context-size", self.context_size),
                            ("--prefill-chunk", self.batch_size)):
            if value:
                args += [flag, str(value)]
        return args


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


def parse_node_exec_entry(text: str) -> tuple[str, str]:
    """One `--node-exec NODE=COMMAND` value; ValueError says what is wrong."""
    node, sep, command = text.partition("=")
    node, command = node.strip(), command.strip()
    if not sep or not node or not command:
        raise ValueError(f"expected NODE=COMMAND (e.g. n1='ip netns exec clowder-n1'), got {text!r}")
    check_node_exec({node: command})
    return node, command


def check_node_exec(node_exec: Mapping[str, str]) -> dict[str, list[str]]:
    """Each node's command prefix as argv; ValueError (naming node_exec) when one cannot be used."""
    prefixes = {}
    for node, command in node_exec.items():
        if not node or any(c.isspace() for c in node):
            raise ValueError(f"node_exec: {node!r} is not a node name")
        try:
            words = shlex.split(command)
        except ValueError as exc:
            raise ValueError(f"node_exec {node}: cannot split {command!r}: {exc}") from None
        if not words:
            raise ValueError(f"node_exec {node}: the command is empty")
        if shutil.which(words[0]) is None:
            raise ValueError(f"node_exec {node}: {words[0]!r} is not an executable on this machine")
        prefixes[node] = words
    return prefixes


class LocalProcessLauncher:
    """Runtimes as processes on this machine (the embedded engine), or on other nodes through node_exec.

    Runtimes do not die with the controller: a killed (or restarted) controller leaves them serving, and
    the next one adopts them. A replica's pid is kept in etcd, so status works for a process this controller
    did not start itself (its /proc cmdline must still name the replica). Under `clowder up` runtimes stop
    when the supervisor is gone (CLOWDER_SUPERVISOR_PID, inherited from the controller's environment), and
    as its children (it is their subreaper) they are stopped with the cluster.

    node_exec maps a node name to a command prefix: a runtime placed on that node runs as
    shlex.split(COMMAND) + the usual argv (e.g. `ip netns exec clowder-n1`, or an ssh command) and listens
    on the host of the node's storage address (port 0) instead of `listen`, so balancers reach it at the
    node's address. Other nodes run plain local processes on `listen`.

    stop_all (the controller's graceful stop) stops every runtime this launcher manages: the ones it started
    and the ones it adopted from an earlier controller (seen running through status()), so a standalone
    controller stopped with SIGTERM leaves nothing behind either way. Only a killed controller leaves its
    runtimes serving.
    """

    def __init__(self, etcd_endpoints: tuple[str, ...], etcd_prefix: str, listen: str, log_dir: pathlib.Path,
                 admin_token: str | None, node_exec: Mapping[str, str] | None = None,
                 child_env: Mapping[str, str] | None = None) -> None:
        self._etcd_endpoints = etcd_endpoints
        self._etcd_prefix = etcd_prefix
        self._listen = listen
        self._log_dir = log_dir
        self._admin_token = admin_token
        # The service credential and TLS paths (security.child_environment): by environment, never argv.
        self._child_env = dict(child_env or {})
        self._node_exec = check_node_exec(node_exec or {})
        self._children: dict[str, subprocess.Popen] = {}
        # Runtimes an earlier controller started that still run: replica id -> pid.
        self._adopted: dict[str, int] = {}

    def log_path(self, deployment: str, replica_id: str) -> pathlib.Path:
        return self._log_dir / f"runtime-{deployment}-{replica_id}.log"

    def _argv(self, spec: RuntimeSpec) -> list[str]:
        prefix = self._node_exec.get(spec.node, [])
        listen = f"{_host(spec.storage_address)}:0" if prefix else self._listen
        return [
            *prefix,
            sys.executable, "-m", "clowder_runtime",
            "--deployment", spec.deployment,
            "--replica-id", spec.replica_id,
            "--node", spec.node,
            "--digest", spec.digest,
            "--storage", spec.storage_address,
            "--listen", listen,
            *spec.settings_args(),
            "--etcd-endpoints", ",".join(self._etcd_endpoints),
            "--etcd-prefix", self._etcd_prefix,
            "--image-config", json_format.MessageToJson(spec.configuration, indent=None),
        ]

    async def start(self, spec: RuntimeSpec) -> int:
        self._log_dir.mkdir(parents=True, exist_ok=True)
        old = self._children.pop(spec.replica_id, None)
        if old is not None and old.poll() is None:
            old.kill()
            await asyncio.to_thread(old.wait, 10)
        self._adopted.pop(spec.replica_id, None)
        # A runtime an earlier controller started for this replica may still run (it was killed between
        # starting it and recording its pid): two runtimes must never serve one replica.
        for pid in _replica_pids(spec.replica_id, self._cluster_args()):
            log.warning("stopping a stray runtime for %s/%s (pid %d)", spec.deployment, spec.replica_id, pid)
            await _terminate(pid, None, 0)
        env = {TOKEN_ENV: self._admin_token} if self._admin_token else {}
        env.update(self._child_env)
        with open(self.log_path(spec.deployment, spec.replica_id), "ab") as log_file:
            # Not tied to the controller's life (no PDEATHSIG): see the class docstring.
            proc = spawn(self._argv(spec), log_file, env=env, die_with_parent=False)
        self._children[spec.replica_id] = proc
        log.info("started runtime %s/%s as pid %d", spec.deployment, spec.replica_id, proc.pid)
        return proc.pid

    def status(self, replica: resources_pb2.Replica) -> RuntimeStatus:
        proc = self._children.get(replica.id)
        if proc is not None:
            code = proc.poll()
            return RuntimeStatus(RuntimeState.RUNNING) if code is None else RuntimeStatus(RuntimeState.EXITED, code)
        # Started by an earlier controller: trust the pid only if it still runs this replica; then adopt it.
        if replica.pid and pid_alive(replica.pid) and self._ours(replica.pid, replica.id):
            if self._adopted.get(replica.id) != replica.pid:
                log.info("adopted runtime %s/%s (pid %d)", replica.deployment, replica.id, replica.pid)
                self._adopted[replica.id] = replica.pid
            return RuntimeStatus(RuntimeState.RUNNING)
        self._adopted.pop(replica.id, None)
        return RuntimeStatus(RuntimeState.EXITED)

    async def stop(self, replica: resources_pb2.Replica, grace: float) -> None:
        proc = self._children.pop(replica.id, None)
        self._adopted.pop(replica.id, None)
        pid = proc.pid if proc is not None else replica.pid
        if proc is None and not (pid and pid_alive(pid) and self._ours(pid, replica.id)):
            return
        await _terminate(pid, proc, grace)
        log.info("stopped runtime %s/%s (pid %d)", replica.deployment, replica.id, pid)

    async def stop_all(self, grace: float) -> None:
        children, self._children = self._children, {}
        adopted, self._adopted = self._adopted, {}
        await asyncio.gather(*(_terminate(p.pid, p, grace) for p in children.values()),
                             *(_terminate(pid, None, grace) for replica_id, pid in adopted.items()
                               if self._ours(pid, replica_id)))

    def _ours(self, pid: int, replica_id: str) -> bool:
        """The process runs this replica of this cluster: replica ids repeat across clusters on one machine
        (they hash the deployment's name and image), so the etcd endpoints and prefix must match too."""
        return _runs_replica(pid, replica_id, self._cluster_args())

    def _cluster_args(self) -> tuple[bytes, ...]:
        return (b"--etcd-endpoints", ",".join(self._etcd_endpoints).encode(), b"--etcd-prefix",
                self._etcd_prefix.encode())


def _host(address: str) -> str:
    """The host part of host:port ([v6]:port keeps its brackets, as --listen expects)."""
    return address.rsplit(":", 1)[0]


def _replica_pids(replica_id: str, cluster_args: tuple[bytes, ...]) -> list[int]:
    """Live processes on this machine (any network namespace: they share our pid namespace) running the replica."""
    found = []
    for entry in os.scandir("/proc"):
        if (entry.name.isdigit() and _runs_replica(int(entry.name), replica_id, cluster_args)
                and pid_alive(int(entry.name))):
            found.append(int(entry.name))
    return found


def _runs_replica(pid: int, replica_id: str, cluster_args: tuple[bytes, ...] = ()) -> bool:
    """pid's command line runs the runtime for replica_id, with cluster_args (flag, value pairs) among its args."""
    try:
        cmdline = pathlib.Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    if b"clowder_runtime" not in cmdline or replica_id.encode() not in cmdline:
        return False
    pairs = set(zip(cmdline, cmdline[1:]))
    return all((flag, value) in pairs for flag, value in zip(cluster_args[::2], cluster_args[1::2]))


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
