"""Several nodes on one machine, in network namespaces this test makes and removes: a node cut off from the
network has its replicas placed elsewhere and the streams it served continue on other replicas; a killed etcd
member leaves the cluster serving and converging.

Layout (all on 10.77.0.0/24, a bridge in the root namespace):
  root namespace, 10.77.0.1: a 3-member etcd, 2 controllers, the balancer (and this test, the client)
  namespaces clwmn-n1..n3, 10.77.0.11-13: a storage service each (node n1..n3) and the runtimes the
  controllers place there (`--node-exec nX='ip netns exec clwmn-nX'`)
Setting a node's veth down in the root namespace cuts that node off from etcd and from the balancer: its
storage lease expires (etcd still answers the controllers), the node is declared lost after the grace
period and its replicas move; streams from its runtimes stall and the balancer continues them elsewhere.

Short TTLs keep the run in minutes: storage lease 3 s, node_lost_grace_s 6 s, leader TTL 5 s.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import signal
import sys
import time

import aiohttp
import pytest

from clowder.client import Client
from clowder.controller.v1 import resources_pb2
from clowder_common.processes import SUPERVISOR_ENV, free_port

from helpers.wait import wait_for_sync
from netns_helpers import (ROOT_ADDRESS, Network, Node, Processes, etcd_healthy, etcd_members, ip,
                           kill_namespace_processes, runtime_pids, wait_port)

pytestmark = [pytest.mark.processes, pytest.mark.e2e, pytest.mark.timeout(420)]

MODEL = "smol"
STORAGE_PORT = 7000
LEASE_TTL_S = 3
NODE_LOST_GRACE_S = 6
START_TIMEOUT_S = 60
READY_TIMEOUT_S = 180
PROMPT = "Write a very long story about a lighthouse keeper and the ships he saw. Take your time."


class MultiNodeCluster:
    def __init__(self, network: Network, procs: Processes, etcd, etcd_prefix: str, token: str,
                 controllers: list[str], http_port: int) -> None:
        self.network = network
        self.procs = procs
        self.etcd = etcd
        self.etcd_prefix = etcd_prefix
        self.token = token
        self.controllers = controllers
        self.base_url = f"http://{ROOT_ADDRESS}:{http_port}"

    def diagnostics(self) -> str:
        """The end of the balancer's and controllers' logs, for a failure message."""
        return "\n".join(f"--- {name}.log\n{self.procs.log_tail(name, 15)}"
                         for name in ("balancer", "controller-0", "controller-1"))

    def node(self, name: str) -> Node:
        return next(n for n in self.network.nodes if n.name == name)

    def control(self) -> Client:
        # Any controller answers the API (the standby too); the first one stays up in this test.
        return Client(controller=self.controllers[0], balancer=self.controllers[0], admin_token=self.token,
                      timeout_s=10)

    def ready_replicas(self, control: Client) -> list[resources_pb2.Replica]:
        return [r for r in control.deployments.replicas(MODEL) if r.state == resources_pb2.REPLICA_STATE_READY]

    def wait_ready(self, control: Client, count: int, timeout: float = READY_TIMEOUT_S,
                   avoid_node: str = "") -> list[resources_pb2.Replica]:
        def check():
            ready = self.ready_replicas(control)
            replicas = control.deployments.replicas(MODEL)
            if len(ready) == count == len(replicas) and all(r.node != avoid_node for r in ready):
                return ready
            return None

        what = f"{count} ready replicas of {MODEL}" + (f" off node {avoid_node}" if avoid_node else "")
        try:
            return wait_for_sync(check, timeout, what, interval=0.5)
        except AssertionError as err:
            raise AssertionError(f"{err}; replicas: {list(control.deployments.replicas(MODEL))}\n"
                                 f"{self.diagnostics()}") from None

    def metric(self, name: str) -> dict[str, float]:
        """One counter of the balancer's /metrics (Prometheus text): {labels: value}."""
        import urllib.request

        with urllib.request.urlopen(f"{self.base_url}/metrics", timeout=10) as reply:
            text = reply.read().decode()
        found = {}
        for line in text.splitlines():
            if line.startswith(name + "{"):
                labels, value = line[len(name) + 1:].rsplit("} ", 1)
                found[labels] = float(value)
        return found

    def continuations(self, outcome: str = "resumed") -> float:
        """Streams the balancer continued on another replica after their first token."""
        return sum(v for labels, v in self.metric("clowder_balancer_continuations_total").items()
                   if f'outcome="{outcome}"' in labels)

    def routed(self) -> dict[str, float]:
        """Runtime calls the balancer opened, by replica id."""
        return {labels.split('replica="', 1)[1].split('"', 1)[0]: v
                for labels, v in self.metric("clowder_balancer_routed_total").items() if 'replica="' in labels}


@pytest.fixture(scope="module")
def multinode(tmp_path_factory, model_path):
    network = Network()
    try:
        network.check_allowed()
    except RuntimeError as err:
        pytest.fail(str(err))
    base = tmp_path_factory.mktemp("multinode")
    etcd_prefix = f"/clowder-mn-{secrets.token_hex(4)}/"
    token = secrets.token_urlsafe(24)
    env = {"CLOWDER_ADMIN_TOKEN": token,
           # Everything stops itself if this test process dies without its finalizers (SIGKILL).
           SUPERVISOR_ENV: str(os.getpid())}
    procs = Processes(base, env)
    try:
        network.create()
        # Ports on the bridge address are picked once it exists; inside a fresh namespace any port is free.
        ports = [free_port(ROOT_ADDRESS) for _ in range(6)]
        etcd = etcd_members(base / "etcd", ports, f"mn-{secrets.token_hex(4)}")
        for member in etcd:
            member.proc = procs.start(f"etcd-{member.name}", member.argv)
        for member in etcd:
            wait_port(ROOT_ADDRESS, member.client_port, START_TIMEOUT_S, member.proc, f"etcd-{member.name}", procs)
        wait_for_sync(lambda: all(etcd_healthy(m) for m in etcd), START_TIMEOUT_S, "a healthy 3-member etcd")
        endpoints = ",".join(m.endpoint for m in etcd)
        common = ["--etcd-endpoints", endpoints, "--etcd-prefix", etcd_prefix]

        for node in network.nodes:
            proc = procs.start(f"storage-{node.name}", [
                *node.exec_prefix, sys.executable, "-m", "clowder_storage", "--node-name", node.name,
                "--listen", f"{node.address}:{STORAGE_PORT}", "--data-dir", str(base / node.name / "storage"),
                "--lease-ttl-s", str(LEASE_TTL_S), *common])
            wait_port(node.address, STORAGE_PORT, START_TIMEOUT_S, proc, f"storage-{node.name}", procs)

        node_exec = [arg for node in network.nodes
                     for arg in ("--node-exec", f"{node.name}={' '.join(node.exec_prefix)}")]
        controllers = []
        for i in range(2):
            port = free_port(ROOT_ADDRESS)
            proc = procs.start(f"controller-{i}", [
                sys.executable, "-m", "clowder_controller", "--listen", f"{ROOT_ADDRESS}:{port}",
                "--data-dir", str(base / f"controller-{i}"), "--leader-ttl-s", "5",
                # One thread per runtime: every "node" shares this machine's cores.
                "--runtime-threads", "1", "--node-lost-grace-s", str(NODE_LOST_GRACE_S), *node_exec, *common])
            wait_port(ROOT_ADDRESS, port, START_TIMEOUT_S, proc, f"controller-{i}", procs)
            controllers.append(f"{ROOT_ADDRESS}:{port}")

        http_port, grpc_port = free_port(ROOT_ADDRESS), free_port(ROOT_ADDRESS)
        proc = procs.start("balancer", [
            sys.executable, "-m", "clowder_balancer", "--http-listen", f"{ROOT_ADDRESS}:{http_port}",
            "--grpc-listen", f"{ROOT_ADDRESS}:{grpc_port}", "--controller-address", controllers[0], *common])
        wait_port(ROOT_ADDRESS, http_port, START_TIMEOUT_S, proc, "balancer", procs)

        cluster = MultiNodeCluster(network, procs, etcd, etcd_prefix, token, controllers, http_port)
        with cluster.control() as control:
            wait_for_sync(lambda: len(control.nodes.list()) == 3, START_TIMEOUT_S, "3 registered nodes")
            control.images.create(MODEL, model_path.as_uri())
            control.deployments.create(MODEL, MODEL, 2)
            ready = cluster.wait_ready(control, 2)
        assert len({r.node for r in ready}) == 2, f"spread placement put both replicas on one node: {ready}"
        yield cluster
    finally:
        procs.stop_all()
        for pid in runtime_pids(etcd_prefix):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for node in network.nodes:
            kill_namespace_processes(node.netns)
        left = network.destroy()
        assert not left, f"network pieces left behind: {left}"
        assert not runtime_pids(etcd_prefix), "runtimes left behind"


async def stream_chat(session: aiohttp.ClientSession, url: str, max_tokens: int, seed: int,
                      first: asyncio.Event) -> dict:
    """One streamed chat completion: its text, whether [DONE] came, any error event, the finish reason."""
    body = {"model": MODEL, "stream": True, "max_tokens": max_tokens, "temperature": 0.8, "seed": seed,
            "messages": [{"role": "user", "content": PROMPT}]}
    result: dict = {"text": "", "done": False, "error": None, "finish": None}
    async with session.post(f"{url}/v1/chat/completions", json=body) as resp:
        if resp.status != 200:
            result["error"] = f"HTTP {resp.status}: {await resp.text()}"
            return result
        async for raw in resp.content:
            line = raw.strip()
            if not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if data == b"[DONE]":
                result["done"] = True
                break
            event = json.loads(data)
            if "error" in event:
                result["error"] = event["error"]
                continue
            for choice in event.get("choices", []):
                if choice.get("delta", {}).get("content"):
                    result["text"] += choice["delta"]["content"]
                    first.set()
                result["finish"] = choice.get("finish_reason") or result["finish"]
    return result


async def open_streams(cluster: MultiNodeCluster, session: aiohttp.ClientSession, count: int, max_tokens: int):
    """`count` streams, returned once every one of them has sent its first token."""
    firsts = [asyncio.Event() for _ in range(count)]
    tasks = [asyncio.create_task(stream_chat(session, cluster.base_url, max_tokens, 100 + i, firsts[i]))
             for i in range(count)]
    deadline = time.monotonic() + 120
    while not all(f.is_set() for f in firsts):
        ended = [t for t in tasks if t.done()]
        if ended or time.monotonic() > deadline:
            for task in tasks:
                task.cancel()
            outcomes = [t.exception() or t.result() for t in ended]
            raise AssertionError(f"not every stream had its first token (ended before: {outcomes})\n"
                                 f"{cluster.diagnostics()}")
        await asyncio.sleep(0.05)
    return tasks


async def finish(cluster: MultiNodeCluster, tasks, timeout: float) -> list[dict]:
    done, pending = await asyncio.wait(tasks, timeout=timeout)
    for task in pending:
        task.cancel()
    assert not pending, f"{len(pending)} streams still open after {timeout:.0f}s\n{cluster.diagnostics()}"
    return [t.result() for t in tasks]


def assert_unbroken(cluster: MultiNodeCluster, results: list[dict]) -> None:
    for result in results:
        assert result["error"] is None and result["done"], f"{result}\n{cluster.diagnostics()}"
        assert result["text"] and result["finish"] in ("stop", "length"), result


async def test_etcd_member_killed_cluster_keeps_serving_and_converging(multinode):
    cluster = multinode
    with cluster.control() as control:
        before = {r.id: r.pid for r in cluster.wait_ready(control, 2)}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300)) as session:
        tasks = await open_streams(cluster, session, 3, 64)
        # The first member is the first endpoint every client was given: the one most of them talk to.
        victim = cluster.etcd[0]
        victim.proc.kill()
        victim.proc.wait(10)
        assert_unbroken(cluster, await finish(cluster, tasks, 180))

        with cluster.control() as control:
            # Converging with a member gone: a scale-up is placed, pulled, started and becomes ready.
            control.deployments.scale(MODEL, 3)
            grown = cluster.wait_ready(control, 3)
            assert len({r.node for r in grown}) == 3
            control.deployments.scale(MODEL, 2)
            after = {r.id: r.pid for r in cluster.wait_ready(control, 2)}
        # Nothing that was serving restarted (the scale-down removed the new replica, the highest slot): the
        # nodes' leases and the runtimes' endpoints moved to the other members in time.
        assert after == before

        reply = await first_reply(session, cluster)
        assert reply

        # The member comes back with its data and rejoins.
        victim.proc = cluster.procs.start(f"etcd-{victim.name}-again", victim.argv)
        wait_for_sync(lambda: etcd_healthy(victim), 60, "the killed etcd member healthy again")


async def first_reply(session: aiohttp.ClientSession, cluster: MultiNodeCluster) -> str:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
    async with session.post(f"{cluster.base_url}/v1/chat/completions", json=body) as resp:
        assert resp.status == 200, await resp.text()
        return (await resp.json())["choices"][0]["message"]["content"]


async def test_node_cut_off_replicas_move_and_its_streams_continue(multinode):
    cluster = multinode
    with cluster.control() as control:
        ready = cluster.wait_ready(control, 2)
    resumed_before, routed_before = cluster.continuations(), cluster.routed()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300)) as session:
        # Long enough that streams on the victim still run when its link goes down (it goes down right after
        # their first token), short enough for two cores shared by five runtimes' worth of work.
        tasks = await open_streams(cluster, session, 4, 120)
        # The victim: the node of the replica that took the most of these streams (the same prompt may draw
        # them all to one replica through prefix affinity).
        routed = cluster.routed()
        busiest = max(ready, key=lambda r: routed.get(r.id, 0) - routed_before.get(r.id, 0))
        assert routed.get(busiest.id, 0) > routed_before.get(busiest.id, 0), (routed_before, routed)
        victim = cluster.node(busiest.node)
        cut = time.monotonic()
        cluster.network.link_down(victim)
        assert "state DOWN" in ip("link", "show", victim.root_link).stdout
        assert_unbroken(cluster, await finish(cluster, tasks, 180))
        # The streams of the victim's replica stalled and moved to another replica: the balancer counts them.
        assert cluster.continuations() > resumed_before, cluster.diagnostics()

        with cluster.control() as control:
            moved = cluster.wait_ready(control, 2, avoid_node=victim.name)
        took = time.monotonic() - cut
        assert victim.name not in {r.node for r in moved}
        # Not before the node could have been declared lost (lease expiry plus the grace period).
        assert took >= NODE_LOST_GRACE_S, took
        assert await first_reply(session, cluster)
