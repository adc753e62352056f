"""Runtime benchmark: the throughput users get from Clowder, against llama.cpp's own C++ server.

In one run, on the same model, prompts, thread count (the default: every core) and sampling:
- path: Clowder as `make up` starts it (`clowder up --demo`, default settings), streamed through the
  balancer's OpenAI HTTP API, which is what a user gets;
- runtime: Clowder's runtime alone (a process with the settings `make up` gives the bundled model: its default
  threads, the demo aimage's slots), streamed over gRPC;
- llama-server: llama.cpp's C++ server (`llama-server -np N` at N streams, its best setting for the load),
  built once from the llama.cpp sources vendored in the llama-cpp-python sdist in use (bench/llama_server.py);
- llama_cpp.server: llama-cpp-python's OpenAI server;
- the decode ceiling: llama_decode alone at batch 1, 8 and 16 (no server, no sampling).

Aggregate tokens/s at 1, 4, 8 and 16 concurrent streams, greedy (temperature 0) and sampled (temperature 0.7,
seeded). Systems take turns within each level and round (every other round in reverse order), so drift in
machine load hits all alike; a ratio to llama-server is the median of the rounds' ratios (five rounds by
default: on a two-core machine a single round moves by 10-20%). Also
reported: time to first token at 8 streams, memory per slot, and time to first token for a long repeated prefix
with and without prefix reuse. The last line is JSON; the targets are on the sampled figures.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator

import grpc
import httpx
import llama_cpp
from clowder.runtime.v1 import runtime_pb2, runtime_pb2_grpc

from clowder_cli.bundled import DEMO_SLOTS, bundled_model_path
from clowder_common.processes import free_port, spawn, terminate, wait_for_port

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from llama_server import llama_server  # noqa: E402  (a sibling module, not a package)

PROMPTS = [
    "Once upon a time", "The capital of France is", "def fibonacci(n):", "My favourite animal is",
    "In 1492, Columbus", "The best way to learn", "Water boils at", "Hello, my name is",
    "The history of the bicycle", "A recipe for bread:", "The moon is", "Dear diary, today",
    "The rules of chess are", "Photosynthesis is", "The old lighthouse keeper", "To make a paper plane,",
]
LONG_PREFIX = (
    "You are the archivist of the lighthouse of Brannoc. You answer questions about the lighthouse, its keepers,"
    " the storms of the northern coast, the ships that passed and the logbooks kept since the year 1790. "
) * 8
MODES = {"greedy": 0.0, "sampled": 0.7}


def start(argv: list[str], log_path: pathlib.Path, port: int) -> subprocess.Popen:
    with open(log_path, "wb") as log_file:
        proc = spawn(argv, log_file)
    try:
        wait_for_port("127.0.0.1", port, timeout=120, proc=proc)
    except Exception:
        terminate(proc, 5)
        raise SystemExit(f"{argv[0]} did not start; see {log_path}") from None
    return proc


def rss_mib(pid: int) -> float:
    for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


class Stream:
    """(completion tokens, seconds to first text, total seconds) of one streamed request."""

    async def stream(self, prompt: str, tokens: int, temperature: float, seed: int) -> tuple[int, float, float]:
        raise NotImplementedError

    async def close(self) -> None:
        pass


class OpenAIStream(Stream):
    """A streamed /v1/completions on an OpenAI-compatible server (the balancer, llama-server, llama_cpp.server)."""

    def __init__(self, port: int, model: str) -> None:
        self.client = httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=300)
        self.model = model

    async def stream(self, prompt: str, tokens: int, temperature: float, seed: int) -> tuple[int, float, float]:
        try:
            return await self._stream(prompt, tokens, temperature, seed)
        except httpx.RemoteProtocolError as exc:
            # A pooled connection the server closed as idle just as it was reused (uvicorn and llama-server
            # close idle ones after 5 s): nothing was answered, so send it again, on a new connection.
            if "without sending a response" not in str(exc):
                raise
            return await self._stream(prompt, tokens, temperature, seed)

    async def _stream(self, prompt: str, tokens: int, temperature: float, seed: int) -> tuple[int, float, float]:
        body = {"model": self.model, "prompt": prompt, "max_tokens": tokens, "temperature": temperature,
                "seed": seed, "stream": True, "stream_options": {"include_usage": True}}
        started = time.perf_counter()
        first = None
        chunks = 0
        usage = None
        async with self.client.stream("POST", "/v1/completions", json=body) as response:
            response.raise_for_status()
            async for line in response.aiter_lines():
                if not line.startswith("data: {"):
                    continue
                event = json.loads(line[6:])
                usage = event.get("usage") or usage
                choices = event.get("choices") or ()
                if choices and choices[0].get("text"):
                    chunks += 1
                    if first is None:
                        first = time.perf_counter() - started
        elapsed = time.perf_counter() - started
        # A server that sends no usage sends one token a chunk (English text, no split UTF-8).
        count = usage["completion_tokens"] if usage else chunks
        return count, first or elapsed, elapsed

    async def close(self) -> None:
        await self.client.aclose()


class RuntimeStream(Stream):
    """A streamed Generate on Clowder's runtime over gRPC."""

    def __init__(self, port: int) -> None:
        self.channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        self.stub = runtime_pb2_grpc.RuntimeServiceStub(self.channel)

    async def stream(self, prompt: str, tokens: int, temperature: float, seed: int) -> tuple[int, float, float]:
        sampling = runtime_pb2.SamplingParams(temperature=temperature, max_tokens=tokens, seed=seed)
        request = runtime_pb2.GenerateRequest(request_id=f"bench-{uuid.uuid4().hex[:8]}", prompt=prompt,
                                              sampling=sampling)
        started = time.perf_counter()
        first = None
        last = None
        async for response in self.stub.Generate(request, timeout=300):
            if first is None and response.text:
                first = time.perf_counter() - started
            last = response
        elapsed = time.perf_counter() - started
        assert last is not None and last.finish_reason, "stream ended without a finish"
        return last.usage.completion_tokens, first or elapsed, elapsed

    async def close(self) -> None:
        await self.channel.close()


async def level(server: Stream, streams: int, tokens: int, temperature: float) -> tuple[float, float]:
    """(aggregate tokens/s, median seconds to first token) of `streams` concurrent requests."""
    started = time.perf_counter()
    results = await asyncio.gather(*(server.stream(PROMPTS[i % len(PROMPTS)], tokens, temperature, 1000 + i)
                                     for i in range(streams)))
    elapsed = time.perf_counter() - started
    return sum(n for n, _, _ in results) / elapsed, statistics.median(first for _, first, _ in results)


class Cluster:
    """`clowder up --demo` in a scratch data directory: the cluster a user gets from `make up`."""

    def __init__(self, workdir: pathlib.Path) -> None:
        self.data_dir = workdir / "cluster"
        self.port = free_port()
        self.log = open(workdir / "clowder-up.log", "wb")
        env = {k: v for k, v in os.environ.items() if k != "CLOWDER_ADMIN_TOKEN"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "clowder_cli.main", "--data-dir", str(self.data_dir), "up", "--demo",
             "--http-port", str(self.port), "--internal-ports", "auto"],
            stdout=self.log, stderr=subprocess.STDOUT, env=env)

    def wait_ready(self, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"clowder up exited with {self.proc.returncode}; see {self.log.name}")
            if b"cluster up" in pathlib.Path(self.log.name).read_bytes():
                return
            time.sleep(0.5)
        raise SystemExit(f"clowder up not ready after {timeout:.0f} s; see {self.log.name}")

    def runtime_pid(self) -> int | None:
        """The demo replica's runtime: the one that watches this `clowder up` (CLOWDER_SUPERVISOR_PID)."""
        for proc in pathlib.Path("/proc").iterdir():
            with contextlib.suppress(OSError):
                argv = (proc / "cmdline").read_bytes().split(b"\0")
                env = (proc / "environ").read_bytes().split(b"\0")
                if b"clowder_runtime" in argv and f"CLOWDER_SUPERVISOR_PID={self.proc.pid}".encode() in env:
                    return int(proc.name)
        return None

    def stop(self) -> None:
        subprocess.run([sys.executable, "-m", "clowder_cli.main", "--data-dir", str(self.data_dir), "down"],
                       capture_output=True, timeout=120)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(60)
        if self.proc.poll() is None:
            terminate(self.proc, 10)
        self.log.close()


@contextlib.asynccontextmanager
async def llama_server_at(binary: pathlib.Path, model: str, streams: int, args: argparse.Namespace,
                          workdir: pathlib.Path) -> AsyncIterator[tuple[OpenAIStream, int]]:
    """llama-server with one slot per stream, each with the context a Clowder slot has."""
    port = free_port()
    proc = start([str(binary), "-m", model, "-t", str(args.threads), "-tb", str(args.threads),
                  "-np", str(streams), "-c", str(streams * args.context_size), "--host", "127.0.0.1",
                  "--port", str(port), "--no-webui"],
                 workdir / f"llama-server-{streams}.log", port)
    client = OpenAIStream(port, "smol")
    try:
        await wait_http_ready(client.client, "/health")
        yield client, proc.pid
    finally:
        await client.close()
        terminate(proc, 10)


async def wait_http_ready(client: httpx.AsyncClient, path: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            if (await client.get(path)).status_code == 200:
                return
        await asyncio.sleep(0.2)
    raise SystemExit(f"{client.base_url}{path} not ready after {timeout:.0f} s")


async def measure(args: argparse.Namespace, model: str, workdir: pathlib.Path) -> dict:
    cluster = Cluster(workdir)
    runtime_port, cpp_port = free_port(), free_port()
    runtime = start([sys.executable, "-m", "clowder_runtime", "--model-path", model, "--listen",
                     f"127.0.0.1:{runtime_port}", "--deployment", "bench", "--replica-id", "r0",
                     "--slots", str(DEMO_SLOTS)],
                    workdir / "runtime.log", runtime_port)
    cpp = start([sys.executable, "-m", "llama_cpp.server", "--model", model, "--model_alias", "smol",
                 "--n_threads", str(args.threads), "--n_threads_batch", str(args.threads),
                 "--n_ctx", str(args.context_size), "--flash_attn", "true", "--host", "127.0.0.1",
                 "--port", str(cpp_port),
                 # Its default lets a new request cut off the one streaming; here requests queue instead.
                 "--interrupt_requests", "false"],
                workdir / "llama_cpp_server.log", cpp_port)
    binary = llama_server()
    servers: dict[str, Stream] = {}
    try:
        cluster.wait_ready()
        servers = {"path": OpenAIStream(cluster.port, "smol"), "runtime": RuntimeStream(runtime_port),
                   "llama_cpp_server": OpenAIStream(cpp_port, "smol")}
        for server in servers.values():  # warm-up: model pages, thread pools, first-request paths
            await server.stream(PROMPTS[0], 8, 0.0, 1)
        results: dict[str, dict[int, dict[str, dict[str, float]]]] = {mode: {} for mode in MODES}
        memory: dict[str, float] = {}
        for streams in args.levels:
            async with contextlib.AsyncExitStack() as stack:
                turn: dict[str, Stream] = dict(servers)
                if binary is not None:
                    server, pid = await stack.enter_async_context(
                        llama_server_at(binary, model, streams, args, workdir))
                    await server.stream(PROMPTS[0], 8, 0.0, 1)
                    turn["llama_server"] = server
                for mode, temperature in MODES.items():
                    samples: dict[str, list[tuple[float, float]]] = {name: [] for name in turn}
                    for round_ in range(args.repeats):
                        # Every other round in reverse order, so no system always follows the same one.
                        names = list(turn) if round_ % 2 == 0 else list(reversed(turn))
                        for name in names:
                            if name == "llama_cpp_server" and round_ > 0:
                                # The weakest baseline and the slowest to measure (it serves one request at a
                                # time): one round keeps the run within minutes.
                                continue
                            samples[name].append(await level(turn[name], streams, args.tokens, temperature))
                    figures = {name: {"tps": statistics.median(s[0] for s in runs),
                                      "ttft_ms": statistics.median(s[1] for s in runs) * 1000}
                               for name, runs in samples.items()}
                    if "llama_server" in samples:
                        # Path and llama-server measured in the same round, minutes apart at most: the median of
                        # the rounds' ratios cancels the machine's drift between rounds (the headline ratio).
                        figures["path"]["paired_ratio"] = statistics.median(
                            p[0] / s[0] for p, s in zip(samples["path"], samples["llama_server"]))
                    results[mode][streams] = figures
                    print(f"{mode:>7} {streams:>2} streams: " + "  ".join(
                        f"{name} {f['tps']:6.1f} tok/s" for name, f in figures.items())
                        + ratio_text(figures), flush=True)
                if streams == 8:
                    path_runtime = cluster.runtime_pid()
                    memory = {"path_runtime_rss_mib": rss_mib(path_runtime) if path_runtime else 0.0,
                              "runtime_rss_mib": rss_mib(runtime.pid),
                              "llama_cpp_server_rss_mib": rss_mib(cpp.pid)}
                    if binary is not None:
                        memory["llama_server_np8_rss_mib"] = rss_mib(pid)

        # Time to first token for a long prefix: first sight (a fresh nonce defeats the cache) vs repeated.
        cold, warm = [], []
        for _ in range(3):
            prefix = f"[{uuid.uuid4().hex}] " + LONG_PREFIX
            cold.append((await servers["runtime"].stream(prefix + "Question: who built it?", 1, 0.0, 1))[1])
            warm.append((await servers["runtime"].stream(prefix + "Question: when was it lit?", 1, 0.0, 1))[1])
        ttft = {"cold_ms": statistics.median(cold) * 1000, "reused_ms": statistics.median(warm) * 1000}
        print(f"long prefix ({len(LONG_PREFIX)} chars) time to first token: without reuse "
              f"{ttft['cold_ms']:.0f} ms, with reuse {ttft['reused_ms']:.0f} ms", flush=True)
    finally:
        for server in servers.values():
            await server.close()
        terminate(cpp, 10)
        terminate(runtime, 15)
        cluster.stop()
    return {"results": results, "ttft": ttft, "memory": memory, "llama_server": binary is not None}


def ratio_text(figures: dict[str, dict[str, float]]) -> str:
    if "llama_server" not in figures:
        return ""
    return (f"   path/llama-server {figures['path']['paired_ratio']:.2f}x paired"
            f" ({figures['path']['tps'] / figures['llama_server']['tps']:.2f}x of medians)")


def decode_throughput(model: str, threads: int, sequences: int, steps: int) -> float:
    """Tokens/s of llama_decode alone, `sequences` tokens per step (one per sequence), as the runtime's
    context is set up (flash attention, one KV stream per slot); no sampling, no Python between steps
    beyond filling the batch."""
    # llama.cpp reports through this logger; its load chatter would bury the figures.
    logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)
    model_params = llama_cpp.llama_model_default_params()
    weights = llama_cpp.llama_model_load_from_file(model.encode(), model_params)
    params = llama_cpp.llama_context_default_params()
    params.n_ctx = (steps + 16) * sequences
    params.n_seq_max = sequences
    params.n_batch = params.n_ubatch = max(32, sequences)
    params.n_threads = params.n_threads_batch = threads
    params.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED
    params.kv_unified = False  # as the runtime: one KV stream per slot
    params.no_perf = True
    ctx = llama_cpp.llama_init_from_model(weights, params)
    batch = llama_cpp.llama_batch_init(params.n_batch, 0, 1)
    vocab = llama_cpp.llama_model_get_vocab(weights)
    prompt = (llama_cpp.llama_token * 8)()
    n_prompt = llama_cpp.llama_tokenize(vocab, PROMPTS[0].encode(), len(PROMPTS[0]), prompt, 8, True, True)

    def step(tokens: list[tuple[int, int, int]]) -> None:
        for n, (seq, pos, token) in enumerate(tokens):
            batch.token[n], batch.pos[n], batch.n_seq_id[n] = token, pos, 1
            batch.seq_id[n][0], batch.logits[n] = seq, True
        batch.n_tokens = len(tokens)
        if llama_cpp.llama_decode(ctx, batch) != 0:
            raise RuntimeError("llama_decode failed")

    try:
        for seq in range(sequences):
            step([(seq, pos, prompt[pos]) for pos in range(n_prompt)])
        # The token fed back does not change the work a step does; a fixed one keeps sampling out.
        token = prompt[n_prompt - 1]
        started = time.perf_counter()
        for i in range(steps):
            step([(seq, n_prompt + i, token) for seq in range(sequences)])
        return sequences * steps / (time.perf_counter() - started)
    finally:
        llama_cpp.llama_batch_free(batch)
        llama_cpp.llama_free(ctx)
        llama_cpp.llama_model_free(weights)


def decode_ceiling(model: str, threads: int, steps: int, repeats: int) -> dict[int, float]:
    runs: dict[int, list[float]] = {1: [], 8: [], 16: []}
    for _ in range(repeats):
        for batch in runs:
            runs[batch].append(decode_throughput(model, threads, batch, steps))
    ceiling = {batch: statistics.median(values) for batch, values in runs.items()}
    print("decode ceiling (llama_decode alone): " + ", ".join(
        f"batch {b} {tps:.1f} tok/s" for b, tps in ceiling.items()), flush=True)
    return ceiling


def kv_bytes_per_slot(model: str, context_size: int) -> int:
    """KV cache a slot holds at full context: layers x context x (K + V widths) x 2 bytes (f16)."""
    logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)
    # The whole model (mapped, not read): a vocabulary-only load has no layer figures.
    weights = llama_cpp.llama_model_load_from_file(model.encode(), llama_cpp.llama_model_default_params())
    try:
        layers = llama_cpp.llama_model_n_layer(weights)
        width = llama_cpp.llama_model_n_embd(weights) // llama_cpp.llama_model_n_head(weights)
        kv_heads = llama_cpp.llama_model_n_head_kv(weights)
    finally:
        llama_cpp.llama_model_free(weights)
    return layers * context_size * 2 * kv_heads * width * 2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-path", default=None, help="GGUF (default: the bundled SmolLM2-135M)")
    # What `make up` gives a runtime alone on a node: every core.
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--tokens", type=int, default=64, help="max_tokens per request")
    parser.add_argument("--context-size", type=int, default=2048, help="per slot (the runtime's default)")
    parser.add_argument("--levels", type=int, nargs="+", default=[1, 4, 8, 16], help="concurrent streams")
    parser.add_argument("--repeats", type=int, default=5,
                        help="measured rounds per level and mode (median; the ratios to llama-server: median of the"
                             " rounds' ratios)")
    args = parser.parse_args()
    model = args.model_path or str(bundled_model_path())
    print(f"model={pathlib.Path(model).name} threads={args.threads} tokens={args.tokens} "
          f"repeats={args.repeats} cpus={os.cpu_count()}", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-runtime-") as tmp:
        result = asyncio.run(measure(args, model, pathlib.Path(tmp)))
    ceiling = decode_ceiling(model, args.threads, args.tokens * 2, 3)
    kv_mib = kv_bytes_per_slot(model, args.context_size) / 2**20
    results = result["results"]
    sampled, greedy = results["sampled"], results["greedy"]

    def ratio(figures: dict[int, dict[str, dict[str, float]]], streams: int, a: str, b: str) -> float | None:
        at = figures.get(streams)
        if not at or a not in at or b not in at:
            return None
        if (a, b) == ("path", "llama_server"):
            return round(at[a]["paired_ratio"], 3)
        return round(at[a]["tps"] / at[b]["tps"], 3)

    def ratio_of_medians(figures: dict[int, dict[str, dict[str, float]]], streams: int) -> float | None:
        at = figures.get(streams)
        if not at or "llama_server" not in at:
            return None
        return round(at["path"]["tps"] / at["llama_server"]["tps"], 3)

    def column(figures: dict[int, dict[str, dict[str, float]]], name: str) -> dict[str, float]:
        return {str(k): round(v[name]["tps"], 1) for k, v in figures.items() if name in v}

    runtime_at8 = sampled.get(8, {}).get("runtime", {}).get("tps")
    ttft8 = {name: round(f["ttft_ms"], 1) for name, f in sampled.get(8, {}).items()}
    print(f"memory: KV cache per slot at {args.context_size} tokens {kv_mib:.1f} MiB; "
          + ", ".join(f"{k} {v:.0f}" for k, v in result["memory"].items()), flush=True)
    print(f"time to first token at 8 sampled streams (median ms): {ttft8}", flush=True)
    if not result["llama_server"]:
        print("llama-server was not built: the ratios against it are null", flush=True)
    print(json.dumps({
        "path_tps_ratio_vs_llama_server_at_8": ratio(sampled, 8, "path", "llama_server"),
        "path_tps_ratio_vs_llama_server_at_16": ratio(sampled, 16, "path", "llama_server"),
        "single_stream_ratio_vs_llama_server": ratio(sampled, 1, "path", "llama_server"),
        "runtime_vs_decode_ceiling_at_8": round(runtime_at8 / ceiling[8], 3) if runtime_at8 else None,
        "greedy_path_tps_ratio_vs_llama_server_at_8": ratio(greedy, 8, "path", "llama_server"),
        "path_tps_ratio_of_medians_vs_llama_server": {str(n): ratio_of_medians(sampled, n) for n in sampled},
        "path_vs_runtime_at_8": ratio(sampled, 8, "path", "runtime"),
        "runtime_tps_ratio_vs_llama_cpp_server_at_8": ratio(sampled, 8, "runtime", "llama_cpp_server"),
        "sampled_tps": {name: column(sampled, name)
                        for name in ("path", "runtime", "llama_server", "llama_cpp_server")},
        "greedy_tps": {name: column(greedy, name)
                       for name in ("path", "runtime", "llama_server", "llama_cpp_server")},
        "ttft_ms_at_8_sampled": ttft8,
        "kv_mib_per_slot": round(kv_mib, 1),
        "rss_mib_at_8": {k: round(v, 1) for k, v in result["memory"].items()},
        "ttft_long_prefix_cold_ms": round(result["ttft"]["cold_ms"], 1),
        "ttft_long_prefix_reused_ms": round(result["ttft"]["reused_ms"], 1),
        "decode_ceiling_tps": {str(k): round(v, 1) for k, v in ceiling.items()},
        "threads": args.threads,
        "tokens": args.tokens,
    }))


if __name__ == "__main__":
    main()
