"""`python -m clowder_storage` as a real process: serves, registers, drains on SIGTERM, refuses to run without a token."""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import subprocess
import sys
import time

import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from clowder.controller.v1 import resources_pb2
from clowder.storage.v1 import storage_pb2, storage_pb2_grpc
from clowder_common import keys
from clowder_common.auth import TOKEN_ENV, bearer_metadata
from clowder_common.clients import aio_channel
from clowder_common.processes import async_wait_for_port, free_port

pytestmark = pytest.mark.processes


def storage_argv(port: int, tmp_path, etcd, prefix: str) -> list[str]:
    return [
        sys.executable, "-m", "clowder_storage",
        "--listen", f"127.0.0.1:{port}",
        "--data-dir", str(tmp_path / "store"),
        "--node-name", "proc-node",
        "--label", "zone=z1",
        "--etcd-endpoints", etcd.endpoint,
        "--etcd-prefix", prefix,
        "--lease-ttl-s", "5",
    ]


def env_without_token() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != TOKEN_ENV}


async def wait_serving(port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    async with aio_channel(f"127.0.0.1:{port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        while True:
            try:
                reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except Exception:
                if time.monotonic() > deadline:
                    raise
            await asyncio.sleep(0.1)


async def test_process_serves_registers_and_drains_on_sigterm(tmp_path, etcd, etcd_prefix, state):
    port = free_port()
    token = secrets.token_urlsafe(24)
    log_path = tmp_path / "storage.log"
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(
            storage_argv(port, tmp_path, etcd, etcd_prefix),
            stdout=log_file, stderr=subprocess.STDOUT, env={**env_without_token(), TOKEN_ENV: token},
        )
    try:
        await async_wait_for_port("127.0.0.1", port, timeout=20)
        await wait_serving(port, timeout=10)
        key = state.key(keys.node("proc-node"))
        node = await state.get(key, resources_pb2.Node)
        assert node is not None
        assert node.value.storage_address == f"127.0.0.1:{port}"
        assert dict(node.value.labels) == {"zone": "z1"}

        async with aio_channel(f"127.0.0.1:{port}") as channel:
            stub = storage_pb2_grpc.StorageServiceStub(channel)
            listed = await stub.ListBlobs(storage_pb2.ListBlobsRequest(), metadata=bearer_metadata(token), timeout=5)
            assert list(listed.blobs) == []

        proc.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(proc.wait, 10)
        assert code == 0
        assert await state.get(key, resources_pb2.Node) is None
        assert f"serving on 127.0.0.1:{port}" in log_path.read_text()
        assert token not in log_path.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)


def test_process_refuses_to_start_without_token(tmp_path, etcd, etcd_prefix):
    result = subprocess.run(
        storage_argv(free_port(), tmp_path, etcd, etcd_prefix),
        env=env_without_token(), capture_output=True, text=True, timeout=30,
    )
    assert result.returncode == 2
    assert TOKEN_ENV in result.stderr
    # It stopped before touching anything.
    assert not (tmp_path / "store").exists()
