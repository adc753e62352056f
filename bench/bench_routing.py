"""Routing benchmark: multi-turn chat over 4 runtime replicas under round-robin, least-load and the default
profile (interleaved in one run), plus the balancer's own overhead against a runtime that answers instantly.

Everything runs on this machine on loopback: a private etcd, 4 `clowder_runtime` processes (1 thread each),
one `clowder_balancer` process per profile, and the client here. The last line is JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import pathlib
import random
import statistics
import subprocess
import sys
import tempfile
import time

import aiohttp
import grpc
import yarl

from clowder.balancer.v1 import inference_pb2, inference_pb2_grpc
from clowder.controller.v1 import resources_pb2
from clowder.runtime.v1 import runtime_pb2, runtime_pb2_grpc
from clowder_cli.bundled import bundled_model_path
from clowder_common import keys
from clowder_common.etcd import EtcdState
from clowder_common.etcd_server import start_etcd
from clowder_common.grpc_server import create_grpc_server
from clowder_common.processes import free_port, spawn, terminate, wait_for_port

DEPLOYMENT = "bench"
FAKE = "instant"
PROFILES = ("round-robin", "least-load", "default")
REPLICAS = 4

WORDS = ("river stone lantern copper meadow signal harbor violet engine quiet orbit cedar pattern marble "
         "thunder basket winter glass falcon ribbon canyon pepper silver anchor puzzle velvet ember").split()
SYSTEM = ("You are a helpful assistant for a team of engineers. Answer briefly and precisely. "
          "Keep answers short. Do not invent facts. ") * 3


def document(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words))


# -- the instant runtime (overhead only) ------------------------------------------------------------


class InstantRuntime(runtime_pb2_grpc.RuntimeServiceServicer):
    """Streams a few fixed chunks at once: whatever time a request takes through it is the balancer's."""

    async def Generate(self, request, context):
        for piece in ("Hello", ",", " world", "!"):
            yield runtime_pb2.GenerateResponse(text=piece)
        yield runtime_pb2.GenerateResponse(finish_reason=runtime_pb2.FINISH_REASON_STOP,
                                           usage=runtime_pb2.Usage(prompt_tokens=3, completion_tokens=4))

    async def GetStats(self, request, context):
        return runtime_pb2.GetStatsResponse()


async def serve_instant(port_file: str) -> None:
    servicer = InstantRuntime()

    def register(server) -> str:
        runtime_pb2_grpc.add_RuntimeServiceServicer_to_server(servicer, server)
        return runtime_pb2.DESCRIPTOR.services_by_name["RuntimeService"].full_name

    server = create_grpc_server("127.0.0.1:0", [register])
    await server.start()
    pathlib.Path(port_file).write_text(str(server.port))
    await server.server.wait_for_termination()


# -- cluster ----------------------------------------------------------------------------------------


class Cluster:
    def __init__(self, work: pathlib.Path) -> None:
        self.work = work
        self.procs: list[subprocess.Popen] = []
        self.logs = []
        self.etcd = None
        self.state: EtcdState | None = None
        self.grpc_ports: dict[int, int] = {}

    def spawn(self, name: str, argv: list[str]) -> subprocess.Popen:
        log = open(self.work / f"{name}.log", "wb")
        self.logs.append(log)
        proc = spawn(argv, log)
        self.procs.append(proc)
        return proc

    async def start(self, runtimes: int) -> None:
        self.etcd = start_etcd(self.work / "etcd")
        self.state = EtcdState([self.etcd.endpoint], "/bench/")
        await self.state.connect()
        for name in (DEPLOYMENT, FAKE):
            await self.state.put(self.state.key(keys.deployment(name)),
                                 resources_pb2.Deployment(name=name, image=name, replicas=runtimes))
        model = bundled_model_path()
        for i in range(runtimes):
            self.spawn(f"runtime-{i}", [
                sys.executable, "-m", "clowder_runtime", "--model-path", str(model), "--listen", "127.0.0.1:0",
                "--deployment", DEPLOYMENT, "--replica-id", f"r{i}", "--threads", "1",
                "--etcd-endpoints", self.etcd.endpoint, "--etcd-prefix", "/bench/",
            ])
        port_file = self.work / "instant.port"
        self.spawn("instant", [sys.executable, __file__, "--instant-runtime", str(port_file)])
        deadline = time.monotonic() + 120
        while not port_file.exists() or not port_file.read_text():
            if time.monotonic() > deadline:
                raise SystemExit("the instant runtime did not start")
            await asyncio.sleep(0.1)
        self.instant_address = f"127.0.0.1:{int(port_file.read_text())}"
        await self.state.put(self.state.key(keys.endpoint(FAKE, "i0")),
                             runtime_pb2.Endpoint(deployment=FAKE, replica_id="i0", address=self.instant_address))
        while True:
            found, _ = await self.state.list(self.state.key(keys.endpoints_of(DEPLOYMENT)), runtime_pb2.Endpoint)
            if len(found) == runtimes:
                break
            if any(p.poll() is not None for p in self.procs):
                raise SystemExit(f"a process exited early; logs in {self.work}")
            if time.monotonic() > deadline:
                raise SystemExit("runtimes did not register in time")
            await asyncio.sleep(0.2)

    def balancer(self, profile: str) -> int:
        port, grpc_port = free_port(), free_port()
        self.grpc_ports[port] = grpc_port
        proc = self.spawn(f"balancer-{profile}", [
            sys.executable, "-m", "clowder_balancer", "--http-listen", f"127.0.0.1:{port}",
            "--grpc-listen", f"127.0.0.1:{grpc_port}", "--etcd-endpoints", self.etcd.endpoint,
            "--etcd-prefix", "/bench/", "--routing-profile", profile, "--name", f"bench-{profile}",
        ])
        wait_for_port("127.0.0.1", port, 60, proc)
        return port

    async def stop(self) -> None:
        for proc in self.procs:
            await asyncio.to_thread(terminate, proc, 10)
        for log in self.logs:
            log.close()
        if self.state is not None:
            await self.state.close()
        if self.etcd is not None:
            self.etcd.stop()


# -- client -----------------------------------------------------------------------------------------


JSON = {"Content-Type": "application/json"}


def chat_url(port: int) -> yarl.URL:
    return yarl.URL(f"http://127.0.0.1:{port}/v1/chat/completions")


async def stream_ttft(http: aiohttp.ClientSession, port: int | yarl.URL, body: dict | bytes,
                      usage: list[dict] | None = None) -> tuple[float, str]:
    """Seconds to the first content chunk, and the whole answer; the usage chunk goes to `usage` if given.

    A body given as bytes and a prepared URL are sent as they are: the direct gRPC arm of the overhead
    figure builds its request once too, so neither arm times its client's encoding of a fixed request.
    """
    url = port if isinstance(port, yarl.URL) else chat_url(port)
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    start = time.perf_counter()
    first = None
    texts = []
    async with http.post(url, data=data, headers=JSON) as resp:
        if resp.status != 200:
            raise RuntimeError(f"HTTP {resp.status}: {await resp.text()}")
        async for line in resp.content:
            if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(chunk["error"]["message"])
            if chunk.get("usage") and usage is not None:
                usage.append(chunk["usage"])
            choices = chunk.get("choices") or [{}]
            content = choices[0].get("delta", {}).get("content")
            if content:
                if first is None:
                    first = time.perf_counter() - start
                texts.append(content)
    return (first if first is not None else time.perf_counter() - start), "".join(texts)


async def conversation(http, port: int, rng: random.Random, turns: int, doc_words: int,
                       max_tokens: int, usage: list[dict], arrival_s: float, think_s: float) -> list[float]:
    history = [{"role": "system", "content": SYSTEM},
               {"role": "user", "content": "Here are my notes: " + document(rng, doc_words) + "\nSummarize them."}]
    ttfts = []
    # Users arrive one after another and read each answer before asking again, as on a real service; the
    # draws come from the conversation's own seed, so every profile sees the same arrivals and pauses.
    await asyncio.sleep(arrival_s)
    for turn in range(turns):
        if turn:
            await asyncio.sleep(rng.uniform(0.5, 1.5) * think_s)
        ttft, answer = await stream_ttft(http, port, {
            "model": DEPLOYMENT, "messages": history, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}, usage)
        ttfts.append(ttft)
        history += [{"role": "assistant", "content": answer},
                    {"role": "user", "content": f"Question {turn + 1}: which word comes up most? " +
                     document(rng, 8)}]
    return ttfts


async def routing_phase(http, port: int, seed: int, conversations: int, turns: int, doc_words: int,
                        max_tokens: int, usage: list[dict], arrival_gap_s: float, think_s: float
                        ) -> list[list[float]]:
    """TTFTs of every conversation, turn by turn."""
    arrivals = random.Random(seed)
    starts, at = [], 0.0
    for _ in range(conversations):
        starts.append(at)
        at += arrivals.expovariate(1 / arrival_gap_s) if arrival_gap_s > 0 else 0.0
    return await asyncio.gather(*(
        conversation(http, port, random.Random(seed * 1000 + c), turns, doc_words, max_tokens, usage,
                     starts[c], think_s)
        for c in range(conversations)
    ))


def cached_share(usages: list[dict]) -> float:
    prompt = sum(u["prompt_tokens"] for u in usages)
    cached = sum((u.get("prompt_tokens_details") or {}).get("cached_tokens", 0) for u in usages)
    return cached / prompt if prompt else 0.0


def p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(0.99 * (len(ordered) - 1))))]


async def overhead(http, port: int, grpc_port: int, instant_address: str,
                   samples: int) -> tuple[float, float, float, float]:
    """Median time to the first chunk: direct over gRPC, through the balancer's HTTP API and through its gRPC
    InferenceService, interleaved sample by sample; then what the balancer adds on each face."""
    body = json.dumps({"model": FAKE, "messages": [{"role": "user", "content": "hi"}], "stream": True}).encode()
    url = chat_url(port)
    request = runtime_pb2.GenerateRequest(request_id="bench", sampling=runtime_pb2.SamplingParams())
    request.chat.messages.add(role="user", content="hi")
    via_grpc_request = inference_pb2.CreateChatCompletionRequest(model=FAKE, messages=request.chat.messages)
    direct, via_http, via_grpc = [], [], []

    async def first_chunk(call) -> float:
        start = time.perf_counter()
        await call.read()
        elapsed = time.perf_counter() - start
        call.cancel()
        return elapsed

    async with grpc.aio.insecure_channel(instant_address) as channel, \
            grpc.aio.insecure_channel(f"127.0.0.1:{grpc_port}") as balancer_channel:
        stub = runtime_pb2_grpc.RuntimeServiceStub(channel)
        inference = inference_pb2_grpc.InferenceServiceStub(balancer_channel)
        for _ in range(20):  # warm every path
            await stream_ttft(http, url, body)
            await first_chunk(stub.Generate(request))
            await first_chunk(inference.CreateChatCompletion(via_grpc_request))
        for _ in range(samples):
            direct.append(await first_chunk(stub.Generate(request)))
            via_http.append((await stream_ttft(http, url, body))[0])
            via_grpc.append(await first_chunk(inference.CreateChatCompletion(via_grpc_request)))
    d, h, g = statistics.median(direct), statistics.median(via_http), statistics.median(via_grpc)
    return d, h, h - d, g - d


async def streamed_rps(port: int, seconds: float, concurrency: int) -> float:
    body = json.dumps({"model": FAKE, "messages": [{"role": "user", "content": "hi"}], "stream": True}).encode()
    url = chat_url(port)
    done = 0
    stop_at = time.perf_counter() + seconds
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as http:
        async def worker() -> None:
            nonlocal done
            while time.perf_counter() < stop_at:
                await stream_ttft(http, url, body)
                done += 1

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return done / (time.perf_counter() - start)


async def run(args) -> dict:
    work = pathlib.Path(tempfile.mkdtemp(prefix="clowder-bench-routing-"))
    cluster = Cluster(work)
    try:
        await cluster.start(0 if args.overhead_only else REPLICAS)
        ports = {profile: cluster.balancer(profile) for profile in (("default",) if args.overhead_only else PROFILES)}
        timeout = aiohttp.ClientTimeout(total=300)
        async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as http:
            if args.overhead_only:
                direct, via, added, added_grpc = await overhead(
                    http, ports["default"], cluster.grpc_ports[ports["default"]], cluster.instant_address,
                    args.overhead_samples)
                print(f"overhead: direct {direct * 1e3:.3f} ms, via HTTP {via * 1e3:.3f} ms, added {added * 1e3:.3f} ms "
                      f"(HTTP) and {added_grpc * 1e3:.3f} ms (gRPC)")
                rps = await streamed_rps(ports["default"], args.rps_seconds, args.rps_concurrency)
                return {"overhead_ttft_median_ms": round(added * 1e3, 3),
                        "overhead_grpc_ttft_median_ms": round(added_grpc * 1e3, 3), "streamed_rps": round(rps, 1)}
            # Warm every replica (model pages, first decode) outside the measurement.
            await asyncio.gather(*(stream_ttft(http, ports["round-robin"], {
                "model": DEPLOYMENT, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 2,
                "stream": True}) for _ in range(REPLICAS * 2)))
            ttfts: dict[str, list[float]] = {p: [] for p in PROFILES}
            by_turn: dict[str, list[list[float]]] = {p: [[] for _ in range(args.turns)] for p in PROFILES}
            usages: dict[str, list[dict]] = {p: [] for p in PROFILES}
            order = list(PROFILES)
            for rnd in range(args.rounds):
                # Interleaved and reshuffled per round, so a shared machine's load falls on every profile alike.
                random.Random(rnd).shuffle(order)
                for profile in order:
                    # The same conversations for every profile of a round: only the routing differs.
                    seed = rnd
                    started = time.perf_counter()
                    per_conversation = await routing_phase(http, ports[profile], seed, args.conversations,
                                                           args.turns, args.doc_words, args.max_tokens, usages[profile],
                                                           args.arrival_gap_s, args.think_s)
                    got = [t for turns in per_conversation for t in turns]
                    ttfts[profile] += got
                    for turns in per_conversation:
                        for turn, ttft in enumerate(turns):
                            by_turn[profile][turn].append(ttft)
                    print(f"round {rnd} {profile:12s} mean TTFT {statistics.mean(got):.3f}s "
                          f"p99 {p99(got):.3f}s ({len(got)} requests, {time.perf_counter() - started:.1f}s)",
                          flush=True)
            # The overhead figures use the default-profile balancer, routing to the instant runtime.
            direct, via, added, added_grpc = await overhead(
                http, ports["default"], cluster.grpc_ports[ports["default"]], cluster.instant_address,
                args.overhead_samples)
        rps = await streamed_rps(ports["default"], args.rps_seconds, args.rps_concurrency)
        summary = {p: {"mean_ttft_s": round(statistics.mean(v), 4), "p99_ttft_s": round(p99(v), 4),
                       "requests": len(v), "cached_prompt_share": round(cached_share(usages[p]), 3),
                       # The first turn has no history to find anywhere; later turns show what affinity buys.
                       "mean_ttft_by_turn_s": [round(statistics.mean(t), 4) for t in by_turn[p]]}
                   for p, v in ttfts.items()}
        for profile, figures in summary.items():
            print(f"{profile:12s} mean TTFT {figures['mean_ttft_s']:.3f}s p99 {figures['p99_ttft_s']:.3f}s "
                  f"over {figures['requests']} requests; runtimes served {figures['cached_prompt_share']:.0%} "
                  "of prompt tokens from their KV cache; mean TTFT by turn "
                  + ", ".join(f"{t:.3f}s" for t in figures["mean_ttft_by_turn_s"]))
        print(f"overhead: direct gRPC first chunk {direct * 1e3:.2f} ms median, through the balancer (HTTP SSE) "
              f"{via * 1e3:.2f} ms median, added {added * 1e3:.2f} ms; through its gRPC InferenceService "
              f"added {added_grpc * 1e3:.2f} ms")
        print(f"streamed requests/s through one balancer process: {rps:.0f} ({args.rps_concurrency} clients)")
        return {
            "ttft_mean_ratio_vs_round_robin": round(summary["default"]["mean_ttft_s"]
                                                    / summary["round-robin"]["mean_ttft_s"], 3),
            "p99_ratio_vs_least_load": round(summary["default"]["p99_ttft_s"] / summary["least-load"]["p99_ttft_s"], 3),
            "overhead_ttft_median_ms": round(added * 1e3, 3),
            "overhead_grpc_ttft_median_ms": round(added_grpc * 1e3, 3),
            "streamed_rps": round(rps, 1),
            "profiles": summary,
            "machine": f"{os.cpu_count()} cores, shared with other work",
        }
    finally:
        await cluster.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instant-runtime", metavar="PORT_FILE", help=argparse.SUPPRESS)
    parser.add_argument("--overhead-only", action="store_true", help="skip the routing comparison")
    parser.add_argument("--rounds", type=int, default=4, help="more rounds, steadier means (a round is ~10 s per profile)")
    parser.add_argument("--conversations", type=int, default=8)
    parser.add_argument("--arrival-gap-s", type=float, default=0.5,
                        help="mean gap between conversations' starts (Poisson arrivals; 0: all at once)")
    parser.add_argument("--think-s", type=float, default=1.0, help="mean pause between a reply and the next turn")
    parser.add_argument("--turns", type=int, default=3)
    parser.add_argument("--doc-words", type=int, default=200, help="words of per-conversation context")
    parser.add_argument("--max-tokens", type=int, default=12)
    parser.add_argument("--overhead-samples", type=int, default=300)
    parser.add_argument("--rps-seconds", type=float, default=5.0)
    parser.add_argument("--rps-concurrency", type=int, default=32)
    args = parser.parse_args()
    if args.instant_runtime:
        asyncio.run(serve_instant(args.instant_runtime))
        return
    result = asyncio.run(run(args))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
