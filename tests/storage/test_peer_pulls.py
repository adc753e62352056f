"""One download per cluster: three storage processes on loopback share blobs; an origin HTTP server counts what
it serves (each blob once), a silent peer sends pulls back to the origin, an air-gapped node copies only from
peers."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys

import grpc
import pytest

from clowder.storage.v1 import storage_pb2, storage_pb2_grpc
from clowder_common.auth import TOKEN_ENV
from clowder_common.clients import aio_channel
from clowder_common.etcd_server import start_etcd
from clowder_common.processes import async_wait_for_port, free_port

from helpers.storage import TOKEN, digest_of, md, pull, rpc_error
from test_storage_process import wait_serving

pytestmark = pytest.mark.processes

START_TIMEOUT = 30


class Node:
    """One `python -m clowder_storage` process and a stub to it."""

    def __init__(self, name: str, proc: subprocess.Popen, port: int, log_path) -> None:
        self.name = name
        self.proc = proc
        self.port = port
        self.log_path = log_path
        self.channel = aio_channel(f"127.0.0.1:{port}")
        self.stub = storage_pb2_grpc.StorageServiceStub(self.channel)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@contextlib.asynccontextmanager
async def storage_nodes(tmp_path, etcd, prefix: str, names: list[str], env: dict[str, dict[str, str]] | None = None):
    nodes: list[Node] = []
    try:
        for name in names:
            port = free_port()
            log_path = tmp_path / f"{name}.log"
            extra = {TOKEN_ENV: TOKEN, "CLOWDER_HTTP_READ_TIMEOUT_S": "3", **(env or {}).get(name, {})}
            with open(log_path, "wb") as log_file:
                proc = subprocess.Popen(
                    [sys.executable, "-m", "clowder_storage", "--listen", f"127.0.0.1:{port}",
                     "--data-dir", str(tmp_path / name), "--node-name", name, "--etcd-endpoints", etcd.endpoint,
                     "--etcd-prefix", prefix, "--lease-ttl-s", "5"],
                    stdout=log_file, stderr=subprocess.STDOUT, env={**os.environ, **extra})
            nodes.append(Node(name, proc, port, log_path))
        for node in nodes:
            await async_wait_for_port("127.0.0.1", node.port, timeout=START_TIMEOUT)
            await wait_serving(node.port, timeout=START_TIMEOUT)
        yield nodes
    finally:
        for node in nodes:
            await node.channel.close()
            with contextlib.suppress(ProcessLookupError):
                node.proc.send_signal(signal.SIGCONT)
                node.proc.kill()
            await asyncio.to_thread(node.proc.wait, 10)


async def stored_digest(node: Node, url: str, digest: str) -> str:
    messages = await pull(node.stub, url, digest)
    return messages[-1].blob.digest


async def test_three_nodes_read_each_blob_from_the_origin_once(tmp_path, etcd, etcd_prefix, source):
    first = os.urandom(6 << 20)
    second = os.urandom(3 << 20)
    source.blobs["first"] = first
    source.blobs["second"] = second
    # Slow enough that all three pulls of "first" overlap: the later two must wait and copy, not read the origin.
    source.pace_s["first"] = 0.15
    async with storage_nodes(tmp_path, etcd, etcd_prefix, ["node-a", "node-b", "node-c"]) as nodes:
        digests = await asyncio.gather(*(stored_digest(n, source.url("first"), digest_of(first)) for n in nodes))
        assert digests == [digest_of(first)] * 3
        assert source.served["first"] == len(first)
        assert [r for r in source.requests if r[0] == "first"] == [("first", "")]
        assert sum("(chained)" in n.log() for n in nodes) == 2

        # One after another: the first node reads the origin, the next ones copy from a node that holds it.
        for node in nodes:
            assert await stored_digest(node, source.url("second"), digest_of(second)) == digest_of(second)
        assert source.served["second"] == len(second)
        assert len([r for r in source.requests if r[0] == "second"]) == 1

        # Every copy is the real content, readable from each node.
        for node in nodes:
            data = b""
            async for chunk in node.stub.ReadBlob(storage_pb2.ReadBlobRequest(digest=digest_of(second)),
                                                  metadata=md(), timeout=30):
                data += chunk.data
            assert data == second


async def test_concurrent_pulls_chain_from_the_first_while_it_downloads(tmp_path, etcd, etcd_prefix, source):
    data = os.urandom(4 << 20)
    source.blobs["blob"] = data
    # The origin sends its first MiB, then holds: whatever the other nodes get meanwhile came through the first.
    gate = source.holds["blob"] = asyncio.Event()
    url, digest = source.url("blob"), digest_of(data)
    async with storage_nodes(tmp_path, etcd, etcd_prefix, ["node-a", "node-b", "node-c"]) as nodes:
        first = asyncio.ensure_future(pull(nodes[0].stub, url, digest))
        try:
            deadline = asyncio.get_running_loop().time() + 30
            while source.served["blob"] < 1 << 20:
                assert asyncio.get_running_loop().time() < deadline, "the origin was never asked"
                await asyncio.sleep(0.05)

            # Nodes that got the first MiB while the origin held it back; the gate opens once both did.
            reached: set[str] = set()

            async def follow(node: Node) -> list:
                seen = []
                request = storage_pb2.PullBlobRequest(source_url=url, expected_digest=digest)
                async for message in node.stub.PullBlob(request, metadata=md(), timeout=60):
                    seen.append(message)
                    if message.progress.bytes_done >= 1 << 20 and not gate.is_set():
                        reached.add(node.name)
                        if len(reached) == 2:
                            gate.set()
                return seen

            followers = await asyncio.wait_for(asyncio.gather(*(follow(n) for n in nodes[1:])), 60)
            assert await asyncio.wait_for(first, 60)
        finally:
            gate.set()
            first.cancel()
        # The followers got bytes while the origin held: they read the first node's growing download.
        assert reached == {"node-b", "node-c"}
        for seen in followers:
            assert seen[-1].blob.digest == digest
        assert source.served["blob"] == len(data)
        assert len([r for r in source.requests if r[0] == "blob"]) == 1
        assert sum("(chained)" in n.log() for n in nodes[1:]) == 2


async def test_a_silent_peer_sends_the_pull_back_to_the_origin(tmp_path, etcd, etcd_prefix, source):
    data = os.urandom(1 << 20)
    source.blobs["blob"] = data
    async with storage_nodes(tmp_path, etcd, etcd_prefix, ["node-a", "node-b"]) as (a, b):
        assert await stored_digest(a, source.url("blob"), digest_of(data)) == digest_of(data)
        # Stopped, not dead: its node record stays and its port accepts connections, but nothing answers.
        a.proc.send_signal(signal.SIGSTOP)
        try:
            assert await stored_digest(b, source.url("blob"), digest_of(data)) == digest_of(data)
        finally:
            a.proc.send_signal(signal.SIGCONT)
        assert source.served["blob"] == 2 * len(data)
        assert "trying elsewhere" in b.log()


async def test_an_air_gapped_node_pulls_only_from_peers(tmp_path, etcd, etcd_prefix, source):
    data = os.urandom(1 << 20)
    source.blobs["blob"] = data
    env = {"node-c": {"CLOWDER_PEERS_ONLY": "true"}}
    async with storage_nodes(tmp_path, etcd, etcd_prefix, ["node-a", "node-c"], env) as (a, c):
        err = await rpc_error(pull(c.stub, source.url("blob"), digest_of(data)))
        assert err.code() == grpc.StatusCode.UNAVAILABLE
        assert "air-gapped" in err.details()
        # Without a digest no peer can be asked, and the origin is off limits.
        err = await rpc_error(pull(c.stub, source.url("blob")))
        assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert source.served["blob"] == 0

        assert await stored_digest(a, source.url("blob"), digest_of(data)) == digest_of(data)
        assert await stored_digest(c, source.url("blob"), digest_of(data)) == digest_of(data)
        assert source.served["blob"] == len(data)


async def test_a_pull_by_digest_reads_the_origin_while_etcd_does_not_answer(tmp_path, source):
    # A private etcd: stopping the session's one would stall every other test's state.
    own = start_etcd(tmp_path / "etcd", log_path=tmp_path / "etcd.log")
    data = os.urandom(1 << 20)
    source.blobs["blob"] = data
    try:
        async with storage_nodes(tmp_path, own, "/outage/", ["node-a"]) as (a,):
            own.proc.send_signal(signal.SIGSTOP)
            try:
                # No peer can be asked and no claim made: the origin still serves the pull.
                assert await stored_digest(a, source.url("blob"), digest_of(data)) == digest_of(data)
            finally:
                own.proc.send_signal(signal.SIGCONT)
            assert source.served["blob"] == len(data)
            assert "cannot look for peers" in a.log() or "cannot claim the origin read" in a.log()
    finally:
        own.stop()


async def test_a_chain_survives_the_death_of_the_node_it_reads_from(tmp_path, etcd, etcd_prefix, source):
    data = os.urandom(3 << 20)
    source.blobs["blob"] = data
    gate = source.holds["blob"] = asyncio.Event()
    url, digest = source.url("blob"), digest_of(data)
    async with storage_nodes(tmp_path, etcd, etcd_prefix, ["node-a", "node-b"]) as (a, b):
        first = asyncio.ensure_future(pull(a.stub, url, digest))
        try:
            deadline = asyncio.get_running_loop().time() + 30
            while source.served["blob"] < 1 << 20:
                assert asyncio.get_running_loop().time() < deadline, "the origin was never asked"
                await asyncio.sleep(0.05)
            follower = asyncio.ensure_future(pull(b.stub, url, digest))
            while "chaining" not in b.log():
                assert asyncio.get_running_loop().time() < deadline, "node-b never chained from node-a"
                await asyncio.sleep(0.05)
            # The node being read from dies mid-download: its claim goes with its lease (5 s), then node-b
            # reads the origin itself.
            a.proc.kill()
            gate.set()
            messages = await asyncio.wait_for(follower, 60)
        finally:
            gate.set()
            first.cancel()
        assert messages[-1].blob.digest == digest
        assert len([r for r in source.requests if r[0] == "blob"]) == 2
