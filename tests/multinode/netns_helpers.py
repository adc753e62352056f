"""A small network of Linux network namespaces for the multi-node test: one namespace per worker node, joined
by veth pairs to a bridge in the root namespace; and a 3-member etcd on the bridge's address.

Every name starts with NAME_PREFIX so a later run can find and remove what a crashed run left behind.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import pathlib
import shutil
import signal
import subprocess
import time
import urllib.request

from clowder_common.processes import pid_alive, port_open, spawn, terminate

IP = shutil.which("ip") or "/usr/sbin/ip"
NAME_PREFIX = "clwmn"
BRIDGE = f"{NAME_PREFIX}-br"
SUBNET = "10.77.0"
ROOT_ADDRESS = f"{SUBNET}.1"
NODES = ("n1", "n2", "n3")


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run([IP, *args], capture_output=True, text=True, timeout=30)
    if check and done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)} failed ({done.returncode}): {done.stderr.strip()}")
    return done


@dataclasses.dataclass(frozen=True)
class Node:
    name: str
    index: int

    @property
    def netns(self) -> str:
        return f"{NAME_PREFIX}-{self.name}"

    @property
    def address(self) -> str:
        return f"{SUBNET}.{10 + self.index}"

    @property
    def root_link(self) -> str:
        """The veth end in the root namespace, on the bridge: setting it down cuts the node off."""
        return f"{NAME_PREFIX}-{self.name}"

    @property
    def exec_prefix(self) -> list[str]:
        return [IP, "netns", "exec", self.netns]


class Network:
    """Namespaces, veths and the bridge; create() cleans what an earlier run left, destroy() removes all."""

    def __init__(self) -> None:
        self.nodes = [Node(name, i + 1) for i, name in enumerate(NODES)]

    def check_allowed(self) -> None:
        """Fail (not skip) with a clear message when this machine does not let us make namespaces."""
        if not os.path.exists(IP):
            raise RuntimeError("the multi-node test needs iproute2's `ip` (Debian: apt-get install iproute2)")
        probe = f"{NAME_PREFIX}-probe"
        ip("netns", "del", probe, check=False)
        made = ip("netns", "add", probe, check=False)
        if made.returncode != 0:
            raise RuntimeError("the multi-node test needs `ip netns add` (root, CAP_SYS_ADMIN and CAP_NET_ADMIN): "
                               f"{made.stderr.strip()}")
        ip("netns", "del", probe)
        taken = ip("-4", "route", "show", f"{SUBNET}.0/24", check=False).stdout.strip()
        if taken and BRIDGE not in taken:
            raise RuntimeError(f"{SUBNET}.0/24 is already routed on this machine ({taken}); "
                               "the multi-node test needs that private subnet for itself")

    def create(self) -> None:
        self.destroy()
        ip("link", "add", BRIDGE, "type", "bridge")
        ip("addr", "add", f"{ROOT_ADDRESS}/24", "dev", BRIDGE)
        ip("link", "set", BRIDGE, "up")
        for node in self.nodes:
            ip("netns", "add", node.netns)
            inner = f"{node.root_link}-i"
            ip("link", "add", node.root_link, "type", "veth", "peer", "name", inner)
            ip("link", "set", inner, "netns", node.netns)
            ip("-n", node.netns, "link", "set", inner, "name", "eth0")
            ip("-n", node.netns, "addr", "add", f"{node.address}/24", "dev", "eth0")
            ip("-n", node.netns, "link", "set", "eth0", "up")
            ip("-n", node.netns, "link", "set", "lo", "up")
            ip("link", "set", node.root_link, "master", BRIDGE)
            ip("link", "set", node.root_link, "up")

    def link_down(self, node: Node) -> None:
        ip("link", "set", node.root_link, "down")

    def destroy(self) -> list[str]:
        """Kill whatever still runs in our namespaces, then delete them, the veths and the bridge.

        Returns what could not be removed (empty when all went)."""
        left = []
        for node in self.nodes:
            kill_namespace_processes(node.netns)
            ip("netns", "del", node.netns, check=False)
            ip("link", "del", node.root_link, check=False)
        ip("link", "del", BRIDGE, check=False)
        names = ip("-o", "link", "show").stdout + ip("netns", "list").stdout
        for line in names.splitlines():
            if NAME_PREFIX in line:
                left.append(line.strip())
        return left


def kill_namespace_processes(netns: str) -> None:
    """SIGKILL every process inside `netns` (a namespace with processes in it outlives `ip netns del`)."""
    listed = ip("netns", "pids", netns, check=False)
    for pid in (int(p) for p in listed.stdout.split() if p.isdigit()):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


class Processes:
    """Every process the test starts, stopped in reverse order at the end."""

    def __init__(self, log_dir: pathlib.Path, env: dict[str, str]) -> None:
        self.log_dir = log_dir
        self.env = env
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self, name: str, argv: list[str], extra_env: dict[str, str] | None = None) -> subprocess.Popen:
        with open(self.log_dir / f"{name}.log", "ab") as log_file:
            proc = spawn(argv, log_file, env={**self.env, **(extra_env or {})})
        self.procs[name] = proc
        return proc

    def log_tail(self, name: str, lines: int = 30) -> str:
        try:
            return "\n".join((self.log_dir / f"{name}.log").read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop_all(self) -> None:
        for proc in reversed(list(self.procs.values())):
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGCONT)  # a stopped process cannot act on SIGTERM
            terminate(proc, grace=10)


def runtime_pids(etcd_prefix: str) -> list[int]:
    """Runtimes of this test's cluster (their command line names its etcd prefix), in any namespace."""
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            argv = pathlib.Path(f"/proc/{entry.name}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"clowder_runtime" in argv and etcd_prefix.encode() in argv and pid_alive(int(entry.name)):
            found.append(int(entry.name))
    return found


@dataclasses.dataclass
class EtcdMember:
    name: str
    client_port: int
    peer_port: int
    data_dir: pathlib.Path
    argv: list[str]
    proc: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"{ROOT_ADDRESS}:{self.client_port}"


def etcd_members(base: pathlib.Path, ports: list[int], token: str) -> list[EtcdMember]:
    """Three members listening on the bridge's address, so every namespace reaches them."""
    binary = shutil.which("etcd")
    if binary is None:
        raise RuntimeError("the etcd binary is not installed (Debian: apt-get install etcd-server)")
    names = [f"m{i}" for i in range(3)]
    peers = ",".join(f"{n}=http://{ROOT_ADDRESS}:{ports[3 + i]}" for i, n in enumerate(names))
    members = []
    for i, name in enumerate(names):
        client = f"http://{ROOT_ADDRESS}:{ports[i]}"
        peer = f"http://{ROOT_ADDRESS}:{ports[3 + i]}"
        data = base / name
        members.append(EtcdMember(name, ports[i], ports[3 + i], data, [
            binary, "--name", name, "--data-dir", str(data),
            "--listen-client-urls", client, "--advertise-client-urls", client,
            "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
            "--initial-cluster", peers, "--initial-cluster-token", token, "--initial-cluster-state", "new",
            "--logger=zap", "--log-level=warn",
        ]))
    return members


def etcd_healthy(member: EtcdMember) -> bool:
    """etcd's /health: true once the member is in a cluster that has a leader."""
    try:
        with urllib.request.urlopen(f"http://{member.endpoint}/health", timeout=1) as reply:
            return json.loads(reply.read()).get("health") == "true"
    except (OSError, ValueError):
        return False


def wait_port(host: str, port: int, timeout: float, proc: subprocess.Popen, name: str, procs: Processes) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"{name} exited with code {proc.returncode}:\n{procs.log_tail(name)}")
        if port_open(host, port):
            return
        time.sleep(0.1)
    raise AssertionError(f"{name} did not open {host}:{port} within {timeout:.0f}s:\n{procs.log_tail(name)}")
