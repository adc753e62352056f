"""The local launcher with real processes: adopting runtimes an earlier controller started, stray runtimes,
node_exec (a runtime started through a per-node command, listening on the node's address)."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import time

import pytest

from clowder.controller.v1 import resources_pb2
from clowder_common.processes import pid_alive
from clowder_controller.launcher import LocalProcessLauncher, RuntimeSpec, RuntimeState

pytestmark = pytest.mark.processes

ETCD = ("127.0.0.1:1",)

# Stands in for a runtime: python ignores the arguments after -c's code, but they are in /proc/PID/cmdline.
SLEEPER = "import time; time.sleep(120)"


def fake_runtime(replica_id: str, prefix: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", SLEEPER, "clowder_runtime", "--replica-id", replica_id,
                             "--etcd-endpoints", ",".join(ETCD), "--etcd-prefix", prefix])


def launcher(tmp_path: pathlib.Path, prefix: str = "/a/", node_exec: dict | None = None) -> LocalProcessLauncher:
    return LocalProcessLauncher(ETCD, prefix, "127.0.0.1:0", tmp_path / "logs", "token", node_exec)


def spec(replica_id: str, node: str = "local", storage: str = "127.0.0.1:9") -> RuntimeSpec:
    return RuntimeSpec(deployment="d", replica_id=replica_id, node=node, digest="sha256:00", storage_address=storage,
                       configuration=resources_pb2.ImageConfiguration(), threads=1)


@pytest.fixture
def procs():
    started: list[subprocess.Popen] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


async def test_a_runtime_of_this_cluster_is_adopted_and_stopped_with_the_controller(tmp_path, procs):
    ours = fake_runtime("r1", "/a/")
    other = fake_runtime("r1", "/b/")  # another cluster on this machine, same replica id
    procs += [ours, other]
    time.sleep(0.3)
    mine, theirs = launcher(tmp_path, "/a/"), launcher(tmp_path, "/b/")
    replica = resources_pb2.Replica(id="r1", deployment="d", pid=ours.pid)
    assert mine.status(replica).state is RuntimeState.RUNNING
    # The other cluster's controller must not take our process for its replica.
    assert theirs.status(replica).state is RuntimeState.EXITED
    await mine.stop_all(grace=5)
    assert ours.wait(10) is not None and other.poll() is None


async def test_starting_a_replica_stops_a_stray_runtime_of_this_cluster_only(tmp_path, procs):
    record = tmp_path / "argv.json"
    wrapper = tmp_path / "wrapper.py"
    wrapper.write_text(f"import json, sys\njson.dump(sys.argv[1:], open({str(record)!r}, 'w'))\n")
    stray = fake_runtime("r2", "/a/")
    other = fake_runtime("r2", "/b/")
    procs += [stray, other]
    time.sleep(0.3)
    start = launcher(tmp_path, "/a/", {"n1": f"{sys.executable} {wrapper}"})
    pid = await start.start(spec("r2", node="n1", storage="127.0.0.5:4000"))
    assert stray.wait(10) is not None  # killed before the new runtime started
    assert other.poll() is None
    deadline = time.monotonic() + 30
    while not record.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    argv = json.loads(record.read_text())
    # Started through the node's command, listening on the host of the node's storage address.
    assert argv[:3] == [sys.executable, "-m", "clowder_runtime"]
    assert argv[argv.index("--listen") + 1] == "127.0.0.5:0"
    assert argv[argv.index("--replica-id") + 1] == "r2"
    assert argv[argv.index("--storage") + 1] == "127.0.0.5:4000"
    replica = resources_pb2.Replica(id="r2", deployment="d", pid=pid)
    deadline = time.monotonic() + 30
    while start.status(replica).state is RuntimeState.RUNNING and time.monotonic() < deadline:
        time.sleep(0.05)
    status = start.status(replica)
    assert status.state is RuntimeState.EXITED and status.exit_code == 0


async def test_runtimes_do_not_die_with_the_controller(tmp_path):
    """A 'controller' process starts a runtime (a stand-in) through the launcher and is SIGKILLed."""
    script = tmp_path / "controller.py"
    script.write_text(f"""
import asyncio, pathlib, sys, time
from clowder.controller.v1 import resources_pb2
from clowder_controller.launcher import LocalProcessLauncher, RuntimeSpec

launcher = LocalProcessLauncher(("127.0.0.1:1",), "/a/", "127.0.0.1:0", pathlib.Path({str(tmp_path / "logs")!r}),
                                "token", {{"n1": {sys.executable!r} + " -c 'import time; time.sleep(120)'"}})
spec = RuntimeSpec(deployment="d", replica_id="r3", node="n1", digest="sha256:00", storage_address="127.0.0.1:9",
                   configuration=resources_pb2.ImageConfiguration(), threads=1)
print(asyncio.run(launcher.start(spec)), flush=True)
time.sleep(120)
""")
    controller = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    runtime = 0
    try:
        runtime = int(controller.stdout.readline())
        assert pid_alive(runtime)
        controller.kill()
        controller.wait(10)
        time.sleep(1.0)
        assert pid_alive(runtime)  # started without PDEATHSIG
    finally:
        if controller.poll() is None:
            controller.kill()
        if runtime and pid_alive(runtime):
            os.kill(runtime, 9)


def run_controller(*flags: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "clowder_controller", "--etcd-endpoints", "127.0.0.1:1", *flags],
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, "CLOWDER_ADMIN_TOKEN": "t"})


@pytest.mark.parametrize("value, message", [
    ("n1", "expected NODE=COMMAND"),
    ("=ip netns exec x", "expected NODE=COMMAND"),
    ("n1=", "expected NODE=COMMAND"),
    ("n1=no-such-binary-here --flag", "'no-such-binary-here' is not an executable"),
    ("n1=ip 'unclosed", "cannot split"),
])
def test_a_bad_node_exec_flag_is_a_clear_error(value, message):
    done = run_controller("--node-exec", value)
    assert done.returncode == 2
    assert "--node-exec" in done.stderr and message in done.stderr, done.stderr


def test_node_exec_from_the_environment_is_checked_too():
    done = subprocess.run([sys.executable, "-m", "clowder_controller", "--etcd-endpoints", "127.0.0.1:1"],
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, "CLOWDER_ADMIN_TOKEN": "t", "CLOWDER_NODE_EXEC": "n1=nope-nope"})
    assert done.returncode == 2 and "--node-exec" in done.stderr and "nope-nope" in done.stderr, done.stderr
