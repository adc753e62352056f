"""`python -m clowder_balancer` as a real process: flags, the ready log line, health, and a clean SIGTERM."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time

import aiohttp
import pytest

from clowder_common.processes import async_wait_for_port, free_port, spawn

pytestmark = pytest.mark.processes


async def test_cli_serves_and_stops_on_sigterm(etcd, etcd_prefix, tmp_path):
    http_port, grpc_port = free_port(), free_port()
    log_path = tmp_path / "balancer.log"
    with open(log_path, "wb") as log:
        proc = spawn(
            [sys.executable, "-m", "clowder_balancer", "--http-listen", f"127.0.0.1:{http_port}",
             "--grpc-listen", f"127.0.0.1:{grpc_port}", "--etcd-endpoints", etcd.endpoint,
             "--etcd-prefix", etcd_prefix, "--ready-timeout-s", "1"],
            log,
        )
    try:
        await async_wait_for_port("127.0.0.1", http_port, timeout=20)
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
            async with http.get(f"http://127.0.0.1:{http_port}/healthz") as resp:
                assert resp.status == 200
            async with http.get(f"http://127.0.0.1:{http_port}/v1/models") as resp:
                assert (await resp.json()) == {"object": "list", "data": []}
        await async_wait_for_port("127.0.0.1", grpc_port, timeout=5)
        proc.send_signal(signal.SIGTERM)
        started = time.monotonic()
        assert await asyncio.to_thread(proc.wait, 15) == 0
        assert time.monotonic() - started < 10
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
    text = log_path.read_text()
    assert f"serving on 127.0.0.1:{http_port}" in text
    assert "service=balancer" in text and "stopped" in text


def test_cli_rejects_a_bad_listen_address(etcd):
    result = subprocess.run(
        [sys.executable, "-m", "clowder_balancer", "--http-listen", "nowhere", "--etcd-endpoints", etcd.endpoint],
        capture_output=True, text=True, timeout=30,
    )
    assert result.returncode != 0
    assert "http_listen" in result.stderr
