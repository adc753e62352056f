"""Fairness and limits benchmark: two tenants on one saturated replica, one flooding; and a rate limit through two
balancers at once.

Everything runs on this machine on loopback: a private etcd, one `clowder_runtime` process (the bundled model,
few slots, so the flood saturates it), two `clowder_balancer` processes, and the clients here.

- victim_ttft_p50_ratio: tenant B's p50 time to first token while tenant A floods the model, over B's p50
  alone (target at most 1.5: the fair queue lets B in at the next free slot, not after A's backlog).
- limit_overshoot: requests admitted above a key's requests-per-minute limit, fired concurrently through both
  balancers, over the limit (target at most 0.05).
The last line is JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

import aiohttp

from clowder.balancer.v1 import apikeys_pb2
from clowder.controller.v1 import resources_pb2
from clowder.runtime.v1 import runtime_pb2
from clowder_cli.bundled import bundled_model_path
from clowder_common import keys
from clowder_common.etcd import EtcdState
from clowder_common.etcd_server import start_etcd
from clowder_common.processes import free_port, spawn, terminate, wait_for_port

from clowder_balancer.apikeys import ApiKeyStore

MODEL = "fair"
PREFIX = "/bench-fairness/"
PROMPT = [{"role": "user", "content": "Write one sentence about rivers."}]


class Cluster:
    def __init__(self, work: pathlib.Path, slots: int) -> None:
        self.work = work
        self.slots = slots
        self.procs: list[subprocess.Popen] = []
        self.logs: list = []
        self.etcd = None
        self.state: EtcdState | None = None
        self.ports: list[int] = []

    def spawn(self, name: str, argv: list[str]) -> subprocess.Popen:
        log = open(self.work / f"{name}.log", "wb")
        self.logs.append(log)
        proc = spawn(argv, log)
        self.procs.append(proc)
        return proc

    async def start(self) -> None:
        self.etcd = start_etcd(self.work / "etcd")
        self.state = EtcdState([self.etcd.endpoint], PREFIX)
        await self.state.connect()
        await self.state.put(self.state.key(keys.deployment(MODEL)),
                             resources_pb2.Deployment(name=MODEL, image=MODEL, replicas=1))
        self.spawn("runtime", [
            sys.executable, "-m", "clowder_runtime", "--model-path", str(bundled_model_path()),
            "--listen", "127.0.0.1:0", "--deployment", MODEL, "--replica-id", "r0", "--threads", "2",
            "--slots", str(self.slots), "--etcd-endpoints", self.etcd.endpoint, "--etcd-prefix", PREFIX,
        ])
        for i in range(2):
            port = free_port()
            proc = self.spawn(f"balancer-{i}", [
                sys.executable, "-m", "clowder_balancer", "--http-listen", f"127.0.0.1:{port}",
                "--grpc-listen", f"127.0.0.1:{free_port()}", "--etcd-endpoints", self.etcd.endpoint,
                "--etcd-prefix", PREFIX, "--name", f"bench-{i}", "--controller-address", "",
            ])
            wait_for_port("127.0.0.1", port, 60, proc)
            self.ports.append(port)
        deadline = time.monotonic() + 120
        while not (await self.state.list(self.state.key(keys.endpoints_of(MODEL)), runtime_pb2.Endpoint))[0]:
            if any(p.poll() is not None for p in self.procs):
                raise SystemExit(f"a process exited early; logs in {self.work}")
            if time.monotonic() > deadline:
                raise SystemExit("the runtime did not register in time")
            await asyncio.sleep(0.2)

    async def key(self, description: str, **limits) -> str:
        assert self.state is not None
        _, secret = await ApiKeyStore(self.state).create(description, [], apikeys_pb2.KeyLimits(**limits))
        return secret

    async def stop(self) -> None:
        for proc in self.procs:
            await asyncio.to_thread(terminate, proc, 10)
        for log in self.logs:
            log.close()
        if self.state is not None:
            await self.state.close()
        if self.etcd is not None:
            self.etcd.stop()


async def ttft(http: aiohttp.ClientSession, port: int, secret: str, max_tokens: int) -> float:
    body = {"model": MODEL, "messages": PROMPT, "max_tokens": max_tokens, "stream": True, "temperature": 0}
    start = time.perf_counter()
    async with http.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=body,
                         headers={"Authorization": f"Bearer {secret}"}) as resp:
        if resp.status != 200:
            raise RuntimeError(f"HTTP {resp.status}: {await resp.text()}")
        first = None
        async for line in resp.content:
            # The first chunk with text (the opening chunk carries only the role).
            if first is None and line.startswith(b"data: {") and b'"content":"' in line and b'"content":""' not in line:
                first = time.perf_counter() - start
    return first if first is not None else time.perf_counter() - start


async def victim(http, port: int, secret: str, requests: int, max_tokens: int, gap_s: float) -> list[float]:
    out = []
    for _ in range(requests):
        out.append(await ttft(http, port, secret, max_tokens))
        await asyncio.sleep(gap_s)
    return out


async def flood(http, port: int, secret: str, streams: int, max_tokens: int, stop: asyncio.Event) -> int:
    done = 0

    async def loop() -> None:
        nonlocal done
        while not stop.is_set():
            await ttft(http, port, secret, max_tokens)
            done += 1
    await asyncio.gather(*(loop() for _ in range(streams)))
    return done


async def queue_figures(http, port: int) -> dict:
    """The fair queue's wait (both tenants together) from the balancer's /metrics."""
    async with http.get(f"http://127.0.0.1:{port}/metrics") as resp:
        text = await resp.text()
    figures = {}
    for line in text.splitlines():
        for name in ("clowder_balancer_queue_wait_seconds_sum", "clowder_balancer_queue_wait_seconds_count"):
            if line.startswith(name + "{") and f'model="{MODEL}"' in line:
                figures[name] = figures.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
    count = figures.get("clowder_balancer_queue_wait_seconds_count", 0.0)
    return {"queue_wait_mean_s": round(figures.get("clowder_balancer_queue_wait_seconds_sum", 0.0) / count, 4)
            if count else 0.0, "queued_requests": int(count)}


async def overshoot(http, ports: list[int], secret: str, limit: int) -> tuple[int, int]:
    async def one(port: int) -> int:
        body = {"model": MODEL, "messages": PROMPT, "max_tokens": 1}
        async with http.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=body,
                             headers={"Authorization": f"Bearer {secret}"}) as resp:
            await resp.read()
            return resp.status
    statuses = await asyncio.gather(*(one(ports[i % 2]) for i in range(3 * limit)))
    return statuses.count(200), statuses.count(429)


async def run(args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory(prefix="bench-fairness-") as tmp:
        cluster = Cluster(pathlib.Path(tmp), args.slots)
        try:
            await cluster.start()
            a, b = await cluster.key("flooder"), await cluster.key("victim")
            limited = await cluster.key("limited", requests_per_minute=args.rpm)
            port = cluster.ports[0]
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as http:
                # Warm-up: the model loaded, the balancer's stats of the replica's slots known.
                await victim(http, port, b, 2, args.max_tokens, 0.5)
                alone = await victim(http, port, b, args.requests, args.max_tokens, args.gap_s)
                stop = asyncio.Event()
                flooding = asyncio.create_task(flood(http, port, a, args.flood_streams, args.max_tokens, stop))
                await asyncio.sleep(args.warmup_s)
                flooded = await victim(http, port, b, args.requests, args.max_tokens, args.gap_s)
                stop.set()
                flood_done = await flooding
                queue = await queue_figures(http, port)
                admitted, refused = await overshoot(http, cluster.ports, limited, args.rpm)
        finally:
            await cluster.stop()
    p50_alone, p50_flooded = statistics.median(alone), statistics.median(flooded)
    return {
        "victim_ttft_p50_ratio": round(p50_flooded / p50_alone, 3),
        "limit_overshoot": round(max(0, admitted - args.rpm) / args.rpm, 3),
        "victim_ttft_p50_alone_s": round(p50_alone, 4),
        "victim_ttft_p50_flooded_s": round(p50_flooded, 4),
        "flood_requests": flood_done,
        "flood_streams": args.flood_streams,
        "slots": args.slots,
        "limit_rpm": args.rpm,
        "limit_admitted": admitted,
        "limit_refused": refused,
        **queue,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slots", type=int, default=2, help="the replica's slots (few: the flood saturates it)")
    parser.add_argument("--flood-streams", type=int, default=16, help="tenant A's concurrent streams")
    parser.add_argument("--requests", type=int, default=20, help="tenant B's requests per phase")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--gap-s", type=float, default=0.2, help="pause between tenant B's requests")
    parser.add_argument("--warmup-s", type=float, default=3.0, help="flooding before B's requests are timed")
    parser.add_argument("--rpm", type=int, default=40, help="the limited key's requests per minute")
    parser.add_argument("--quick", action="store_true", help="a smoke run: few requests (figures mean little)")
    args = parser.parse_args()
    if args.quick:
        args.flood_streams, args.requests, args.max_tokens, args.warmup_s, args.rpm = 6, 4, 8, 1.0, 10
    result = asyncio.run(run(args))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
