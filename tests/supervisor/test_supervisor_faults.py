"""`clowder up --demo` under faults: each component SIGKILLed in turn; the supervisor restarts it, smol keeps
serving, and `clowder down` still leaves no process behind.

One cluster for the module: the faults are injected one after another, each test waits until the cluster has
healed (the component running again) before the next one starts.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import os
import pathlib
import signal
import threading
import time

import openai
import pytest
from rich.console import Console

from clowder.controller.v1 import resources_pb2
from clowder.storage.v1 import storage_pb2
from clowder_cli.up import pull_with_retry
from clowder_common.processes import SUPERVISOR_ENV, free_port, pid_alive

from cluster_helpers import UpCluster, smol_replica, up_cluster
# The storage tests' ranged HTTP source (it can hold a response after its first MiB).
from helpers.storage import RangedSource

pytestmark = [pytest.mark.processes, pytest.mark.e2e]

READY = resources_pb2.REPLICA_STATE_READY


class Traffic:
    """Streaming chats to smol, one after another, on a thread; every failure or broken stream is kept."""

    def __init__(self, client: openai.OpenAI) -> None:
        self.client = client
        self.served: list[float] = []
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "Traffic":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(120)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                text, finish = "", None
                for chunk in self.client.chat.completions.create(
                        model="smol", messages=[{"role": "user", "content": "Count to five."}], max_tokens=8,
                        stream=True):
                    for choice in chunk.choices:
                        text += choice.delta.content or ""
                        finish = choice.finish_reason or finish
                if finish is None or not text:
                    self.failures.append(f"stream ended without a finish ({text!r})")
                else:
                    self.served.append(time.monotonic())
            except Exception as exc:  # noqa: BLE001 - every failure counts against the fault handling
                self.failures.append(repr(exc))
                time.sleep(0.2)

    def wait_served(self, count: int, after: float, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if sum(1 for t in self.served if t > after) >= count:
                return
            time.sleep(0.1)
        raise AssertionError(f"fewer than {count} requests served in {timeout}s; failures: {self.failures}")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with up_cluster(tmp_path_factory.mktemp("clowder")) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def client(cluster):
    return openai.OpenAI(base_url=f"http://127.0.0.1:{cluster.http_port}/v1", api_key="unused", timeout=60,
                         max_retries=0)


def ppid(pid: int) -> int:
    return int(pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def kill_and_await_restart(cluster: UpCluster, name: str, old: dict, timeout: float = 60) -> tuple[float, dict]:
    """SIGKILL component `name` (as `old` shows it); once running again, its first restart as a new process:
    the time of the kill and the component's new state."""
    os.kill(old["pid"], signal.SIGKILL)
    killed = time.monotonic()
    restarted = cluster.wait_component(name, lambda c: c["state"] == "running" and c["restarts"] == 1,
                                       timeout=timeout)
    assert restarted["restarts"] == 1 and restarted["pid"] != old["pid"]
    return killed, restarted


def test_status_shows_every_component_running(cluster):
    shown = cluster.cli("status", "--json")
    assert shown.returncode == 0, shown.stdout + shown.stderr
    state = json.loads(shown.stdout)
    assert state["running"] is True and state["pid"] == cluster.proc.pid
    assert list(state["components"]) == ["etcd", "storage", "controller", "balancer"]
    for name, component in state["components"].items():
        assert component["state"] == "running" and pid_alive(component["pid"]), (name, component)
        assert component["restarts"] == 0 and component["uptime_s"] >= 0


def test_controller_killed_is_restarted_and_the_runtime_keeps_serving(cluster, client):
    before = smol_replica(cluster)
    controller = cluster.component("controller")
    assert ppid(before.pid) == controller["pid"]
    with Traffic(client) as traffic:
        traffic.wait_served(2, 0, timeout=60)
        killed, restarted = kill_and_await_restart(cluster, "controller", controller)
        assert restarted["last_exit_code"] == -signal.SIGKILL
        # The new controller leads once the old lease expires, sees the runtime running and keeps it.
        cluster.wait_log("controller.log", f"adopted runtime smol/{before.id} (pid {before.pid})", timeout=90)
        adopted = time.monotonic()
        traffic.wait_served(3, adopted, timeout=60)
    assert traffic.failures == []
    assert any(killed < t < adopted for t in traffic.served)  # served while no controller led
    after = smol_replica(cluster)
    assert (after.pid, after.restarts, after.endpoint) == (before.pid, before.restarts, before.endpoint)
    # Orphaned by the killed controller, the runtime is now a child of `clowder up` (the subreaper).
    assert ppid(before.pid) == cluster.proc.pid
    assert "controller exited with code -9" in cluster.text


def test_balancer_killed_is_restarted_and_a_retrying_client_is_served(cluster, client):
    balancer = cluster.component("balancer")
    runtime = smol_replica(cluster)
    os.kill(balancer["pid"], signal.SIGKILL)
    killed = time.monotonic()
    errors = []
    while time.monotonic() - killed < 60:
        try:
            reply = client.chat.completions.create(model="smol", messages=[{"role": "user", "content": "Hi"}],
                                                   max_tokens=4)
            break
        except (openai.APIConnectionError, openai.APIStatusError) as exc:
            errors.append(type(exc).__name__)
            time.sleep(0.2)
    else:
        raise AssertionError(f"not served within 60s of the kill: {errors[-5:]}")
    assert reply.choices[0].message.content
    restarted = cluster.wait_component("balancer", lambda c: c["state"] == "running" and c["restarts"] == 1,
                                      timeout=10)
    assert restarted["restarts"] == 1 and restarted["pid"] != balancer["pid"]
    assert smol_replica(cluster).pid == runtime.pid


@pytest.fixture
def slow_source():
    """A ranged HTTP source on its own event loop thread, holding each response after its first MiB."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    source = RangedSource()
    asyncio.run_coroutine_threadsafe(source.start(), loop).result(30)
    hold = asyncio.Event()
    source.holds["big"] = hold
    source.blobs["big"] = os.urandom(24 << 20)
    yield source, lambda: loop.call_soon_threadsafe(hold.set)
    loop.call_soon_threadsafe(hold.set)
    asyncio.run_coroutine_threadsafe(source.stop(), loop).result(30)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)


def test_storage_killed_mid_pull_is_restarted_and_the_pull_completes(cluster, client, slow_source):
    """`clowder image pull` (pull_with_retry) outlasts the storage restart: the same call ends with the blob."""
    source, release = slow_source
    storage = cluster.component("storage")
    control = cluster.control()
    out = io.StringIO()
    try:
        control.images.create("big", source.url("big"))
        result: list[object] = []

        def pull() -> None:
            try:
                result.append(pull_with_retry(control, "big", Console(file=out, width=200), wait_s=120))
            except Exception as exc:  # noqa: BLE001 - kept for the assertion message
                result.append(exc)

        puller = threading.Thread(target=pull, daemon=True)
        puller.start()
        deadline = time.monotonic() + 60
        while not source.requests and time.monotonic() < deadline:
            time.sleep(0.05)
        assert source.requests, "storage never asked the source"
        time.sleep(1.0)  # the first MiB is in; the rest is held
        assert puller.is_alive(), result
        os.kill(storage["pid"], signal.SIGKILL)
        restarted = cluster.wait_component("storage", lambda c: c["state"] == "running" and c["restarts"] == 1,
                                           timeout=60)
        assert restarted["last_exit_code"] == -signal.SIGKILL
        release()
        puller.join(150)
        assert not puller.is_alive() and isinstance(result[0], storage_pb2.Blob), (result, out.getvalue())
        blob = result[0]
        assert blob.digest == "sha256:" + hashlib.sha256(source.blobs["big"]).hexdigest()
        assert blob.size_bytes == len(source.blobs["big"])
        assert "retrying" in out.getvalue()  # it did break, and was retried
    finally:
        control.close()
    reply = client.chat.completions.create(model="smol", messages=[{"role": "user", "content": "Hi"}], max_tokens=4)
    assert reply.choices[0].message.content


def test_etcd_killed_is_restarted_with_its_data_and_serving_goes_on(cluster, client):
    before = smol_replica(cluster)
    etcd = cluster.component("etcd")
    with Traffic(client) as traffic:
        traffic.wait_served(2, 0, timeout=60)
        killed, restarted = kill_and_await_restart(cluster, "etcd", etcd)
        traffic.wait_served(3, killed, timeout=60)
        time.sleep(5)  # everything re-registers and the reconciler has a look
        traffic.wait_served(2, time.monotonic(), timeout=60)
    assert traffic.failures == []
    control = cluster.control()
    try:
        images = {i.alias for i in control.images.list()}
    finally:
        control.close()
    assert {"smol", "big"} <= images  # the state from before the kill is still there
    after = smol_replica(cluster)
    assert (after.pid, after.restarts) == (before.pid, before.restarts)


def test_status_table_shows_the_restarts(cluster):
    shown = cluster.cli("status")
    assert shown.returncode == 0, shown.stdout + shown.stderr
    rows = {line.split()[1]: line for line in shown.stdout.splitlines() if line.startswith("│")}
    for name in ("etcd", "storage", "controller", "balancer"):
        cells = [c.strip() for c in rows[name].strip("│").split("│")]
        assert cells[1] == "running" and cells[4] == "1" and cells[5] == "-9", cells


def test_down_leaves_no_process_behind(cluster):
    marker = f"{SUPERVISOR_ENV}={cluster.proc.pid}".encode()
    ours = _processes_with_env(marker)
    runtime = smol_replica(cluster).pid
    assert runtime in ours and cluster.component("controller")["pid"] in ours
    down = cluster.cli("down")
    assert down.returncode == 0, down.stdout + down.stderr
    assert cluster.proc.wait(90) == 0
    left = [pid for pid in ours if pid_alive(pid)] + _processes_with_env(marker)
    assert left == [], f"processes left behind: {left}"
    assert not (cluster.data_dir / "cluster.json").exists()
    assert not (cluster.data_dir / "supervisor.json").exists()
    etcd_left = [p for p in _pids() if str(cluster.data_dir).encode() in _cmdline(p)]
    assert etcd_left == []


def _pids() -> list[int]:
    return [int(p.name) for p in pathlib.Path("/proc").iterdir() if p.name.isdigit()]


def _cmdline(pid: int) -> bytes:
    try:
        return pathlib.Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def _processes_with_env(marker: bytes) -> list[int]:
    """Live processes started for this cluster: `clowder up` puts its pid in their environment (runtimes too)."""
    found = []
    for pid in _pids():
        try:
            environ = pathlib.Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if marker in environ and pid_alive(pid):
            found.append(pid)
    return found


def test_a_killed_clowder_up_leaves_no_process_behind(cluster):
    """`clowder up` itself SIGKILLed: its components die with it (PDEATHSIG), its runtimes see it gone.

    Started again from the same data dir (after the down above), without --demo: smol is still deployed in etcd.
    """
    again = UpCluster(cluster.data_dir, free_port(), demo=False)
    try:
        again.wait_for("cluster up", timeout=120)
        marker = f"{SUPERVISOR_ENV}={again.proc.pid}".encode()
        # etcd still says READY with the old runtime's pid until the controller has restarted it.
        deadline = time.monotonic() + 120
        runtime = 0
        while runtime not in _processes_with_env(marker) and time.monotonic() < deadline:
            runtime = smol_replica(again, timeout=120).pid
            time.sleep(0.3)
        ours = _processes_with_env(marker)
        assert runtime in ours and len(ours) == 4  # storage, controller, balancer, the runtime
        etcd = again.component("etcd")["pid"]
        again.proc.kill()
        again.proc.wait(10)
        deadline = time.monotonic() + 30
        left = ours + [etcd]
        while left and time.monotonic() < deadline:
            time.sleep(0.2)
            left = [pid for pid in ours + [etcd] if pid_alive(pid)]
        assert left == [], f"processes left behind: {left}"
    finally:
        if again.proc.poll() is None:
            again.proc.kill()
            again.proc.wait(10)
