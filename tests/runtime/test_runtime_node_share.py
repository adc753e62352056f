"""Threads that no setting fixes follow the runtimes on the node (real etcd, real runtime processes, real model).

A replica started alone took every core and kept them after a second replica joined its node: 3 llama.cpp
threads on 2 cores, and the old replica's requests took 87 s instead of 1.7 s (bench-chaos, issue 11).
"""

from __future__ import annotations

import asyncio
import sys
import time
import urllib.request

import llama_cpp
import pytest
from clowder.controller.v1 import resources_pb2
from clowder.runtime.v1 import runtime_pb2, runtime_pb2_grpc

from clowder_common import keys
from clowder_common.clients import sync_channel
from clowder_common.etcd import EtcdState
from clowder_common.etcd_server import start_etcd
from clowder_common.processes import spawn, terminate
from clowder_runtime.app import create_runtime
from clowder_runtime.config import RuntimeConfig
from clowder_runtime.node_share import NodeShare, runtimes_on_node, share_of_node

# Bounds are generous: the test machine's 2 cores are shared with other test runs.
LOAD_S = 90
FOLLOW_S = 30


@pytest.mark.unit
def test_the_share_counts_this_runtime_and_only_its_node():
    endpoints = [("/p/endpoints/a/r1", "n1"), ("/p/endpoints/b/r1", "n1"), ("/p/endpoints/a/r2", "n2")]
    # Not registered yet: counted anyway, since it runs already.
    assert runtimes_on_node("n1", "/p/endpoints/a/r9", endpoints) == 3
    # Registered: counted once.
    assert runtimes_on_node("n1", "/p/endpoints/a/r1", endpoints) == 2
    assert runtimes_on_node("n3", "/p/endpoints/a/r9", endpoints) == 1
    assert [share_of_node(8, n) for n in (1, 2, 3, 8, 9, 100)] == [8, 4, 2, 1, 1, 1]
    assert share_of_node(2, 0) == 2
    assert share_of_node(4096, 1) == 512  # llama.cpp's limit


@pytest.mark.inprocess
async def test_only_unset_threads_follow_the_node(model_path, etcd):
    def config(**kwargs) -> RuntimeConfig:
        return RuntimeConfig(model_path=str(model_path), etcd_endpoints=(etcd.endpoint,), deployment="d",
                             replica_id="r1", **kwargs)

    assert (await create_runtime(config(node_cpus=4))).follows_node
    # The controller's start value does not fix them; an image that sets threads does.
    assert (await create_runtime(config(node_cpus=4, threads=2))).follows_node
    assert not (await create_runtime(config(node_cpus=4), resources_pb2.ImageConfiguration(threads=2))).follows_node
    assert not (await create_runtime(config(threads=2))).follows_node
    assert not (await create_runtime(RuntimeConfig(model_path=str(model_path), node_cpus=4))).follows_node


class Runtime:
    """`python -m clowder_runtime` registered on node n1; its log is where thread changes show."""

    def __init__(self, tmp_path, model_path, etcd, prefix: str, replica: str, *flags: str) -> None:
        self.log_path = tmp_path / f"{replica}.log"
        self.port_file = tmp_path / f"{replica}.port"
        argv = [
            sys.executable, "-m", "clowder_runtime", "--model-path", str(model_path), "--listen", "127.0.0.1:0",
            "--port-file", str(self.port_file), "--deployment", "d", "--replica-id", replica, "--node", "n1",
            "--context-size", "256", "--slots", "1", "--etcd-endpoints", etcd.endpoint, "--etcd-prefix", prefix,
            *flags,
        ]
        with open(self.log_path, "wb") as log_file:
            self.proc = spawn(argv, log_file)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for(self, text: str, timeout: float, after: int = 0) -> int:
        """Waits for `text` in the log past offset `after`; returns the offset just past it."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = self.log().find(text, after)
            if found >= 0:
                return found + len(text)
            if self.proc.poll() is not None:
                raise AssertionError(f"runtime exited with {self.proc.returncode}:\n{self.log()[-3000:]}")
            time.sleep(0.1)
        raise AssertionError(f"no {text!r} in the log within {timeout:.0f}s:\n{self.log()[-3000:]}")

    def ready(self) -> None:
        self.wait_for("registered endpoint", LOAD_S)

    def generate(self) -> str:
        port = int(self.port_file.read_text())
        with sync_channel(f"127.0.0.1:{port}") as channel:
            responses = runtime_pb2_grpc.RuntimeServiceStub(channel).Generate(runtime_pb2.GenerateRequest(
                prompt="The sky is", sampling=runtime_pb2.SamplingParams(temperature=0, max_tokens=8)), timeout=60)
            return "".join(r.text for r in responses)

    def stop(self) -> None:
        assert terminate(self.proc, grace=20) == 0


@pytest.fixture
def runtimes():
    started: list[Runtime] = []
    yield started
    for runtime in started:
        terminate(runtime.proc, grace=20)


@pytest.mark.processes
def test_runtimes_share_the_node_and_the_last_one_gets_it_back(model_path, etcd, etcd_prefix, tmp_path, runtimes):
    first = Runtime(tmp_path, model_path, etcd, etcd_prefix, "r1", "--threads", "2", "--node-cpus", "2")
    runtimes.append(first)
    first.ready()
    # Alone on the node: every core, as it started.
    first.wait_for("2 cpus shared by 1 runtimes -> 2 threads", FOLLOW_S)
    assert "llama.cpp threads" not in first.log()
    text_alone = first.generate()
    assert text_alone

    # The controller starts the second on its share already (--threads 1); the first follows once it registers.
    second = Runtime(tmp_path, model_path, etcd, etcd_prefix, "r2", "--threads", "1", "--node-cpus", "2")
    runtimes.append(second)
    second.wait_for("2 cpus shared by 2 runtimes -> 1 threads", LOAD_S)
    second.ready()
    mark = first.wait_for("llama.cpp threads 2 -> 1", FOLLOW_S)
    # Same text on fewer threads: the context changed threads between steps, nothing else.
    assert first.generate() == text_alone
    assert second.generate() == text_alone
    assert "llama.cpp threads" not in second.log()  # started on its share, never changed

    # The second leaves (its endpoint is withdrawn on SIGTERM): the first gets every core back.
    second.stop()
    first.wait_for("llama.cpp threads 1 -> 2", FOLLOW_S, after=mark)
    assert first.generate() == text_alone


@pytest.mark.processes
def test_explicit_threads_are_never_changed(model_path, etcd, etcd_prefix, tmp_path, runtimes):
    fixed = Runtime(tmp_path, model_path, etcd, etcd_prefix, "fixed", "--threads", "2")
    runtimes.append(fixed)
    fixed.ready()
    sharing = Runtime(tmp_path, model_path, etcd, etcd_prefix, "sharing", "--threads", "1", "--node-cpus", "2")
    runtimes.append(sharing)
    # The sharing one counts the fixed one (it does run on the node) ...
    sharing.wait_for("2 cpus shared by 2 runtimes -> 1 threads", LOAD_S)
    sharing.ready()
    assert fixed.generate()
    # ... which keeps its threads whatever joins the node.
    assert "threads=2" in fixed.log() and "llama.cpp threads" not in fixed.log()
    assert "threads follow node" not in fixed.log()


@pytest.mark.inprocess
async def test_threads_show_in_stats_and_metrics_and_follow_endpoints_in_etcd(model_path, etcd, etcd_prefix, state):
    app = await create_runtime(RuntimeConfig(
        model_path=str(model_path), etcd_endpoints=(etcd.endpoint,), etcd_prefix=etcd_prefix, deployment="d",
        replica_id="r1", node="n1", node_cpus=2, context_size=256, slots=1, metrics_listen="127.0.0.1:0"))
    await app.start()
    try:
        async def threads_become(n: int) -> None:
            deadline = time.monotonic() + FOLLOW_S
            while app.engine.stats().threads != n:
                assert time.monotonic() < deadline, f"threads stayed {app.engine.stats().threads}, not {n}"
                await asyncio.sleep(0.05)
            # What llama.cpp's context runs on, not only what the engine says.
            assert llama_cpp.llama_n_threads(app.engine._ctx) == n
            assert llama_cpp.llama_n_threads_batch(app.engine._ctx) == n
            metrics = await asyncio.to_thread(
                lambda: urllib.request.urlopen(f"http://127.0.0.1:{app.metrics.port}/metrics", timeout=10).read())
            assert f'clowder_runtime_threads{{model_name="d"}} {float(n)}' in metrics.decode()

        await threads_become(2)
        # Another runtime registers on n1, one on n2: only n1's count.
        other = state.key(keys.endpoint("e", "r1"))
        await state.put(other, runtime_pb2.Endpoint(deployment="e", replica_id="r1", address="127.0.0.1:1", node="n1"))
        await state.put(state.key(keys.endpoint("e", "r2")),
                        runtime_pb2.Endpoint(deployment="e", replica_id="r2", address="127.0.0.1:2", node="n2"))
        await threads_become(1)
        await state.delete(other)
        await threads_become(2)
    finally:
        await app.stop()


@pytest.mark.processes
async def test_an_etcd_outage_leaves_the_threads_as_they_are(tmp_path):
    etcd = start_etcd(tmp_path / "etcd", log_path=tmp_path / "etcd.log")
    state = EtcdState([etcd.endpoint], "/share/")
    await state.connect()
    applied: list[int] = []
    share = NodeShare((etcd.endpoint,), "/share/", "n1", keys.endpoint("d", "r1"), 2, applied.append)
    try:
        await state.put(state.key(keys.endpoint("e", "r1")),
                        runtime_pb2.Endpoint(deployment="e", replica_id="r1", address="127.0.0.1:1", node="n1"))
        etcd.pause()
        # Starting never waits for etcd: the runtime loads and serves on its start value meanwhile.
        await asyncio.wait_for(share.start(), 5)
        await asyncio.sleep(2)
        assert applied == []
        etcd.resume()
        deadline = time.monotonic() + FOLLOW_S
        while applied != [1]:
            assert time.monotonic() < deadline, f"applied {applied}"
            await asyncio.sleep(0.05)
        # etcd gone for good: the watch breaks and cannot rebuild, which says nothing about the node's runtimes.
        await state.close()
        etcd.stop()
        await asyncio.sleep(4)
        assert applied == [1] and share.threads == 1
        await asyncio.wait_for(share.stop(), 20)
    finally:
        etcd.resume()
        await share.stop()
        await state.close()
        etcd.stop()
