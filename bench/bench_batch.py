"""Batch jobs against interactive traffic on `clowder up --demo`: a batch of chat requests while an interactive
streaming load runs, against the same load alone and the same requests sent as concurrent interactive requests.

Measured in this run on this machine; the last line is JSON with batch_tokens_per_s, interactive_ttft_p50_ratio
(p50 time to first token of the interactive load with the batch running / without it) and
batch_vs_interactive_throughput (the batch's completion tokens/s / the same requests sent as concurrent
interactive requests). `--smoke` runs a few requests only, to check the bench itself works.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import openai

from clowder_common.processes import free_port

MODEL = "smol"


def requests_for(count: int, max_tokens: int) -> list[dict]:
    return [{"custom_id": f"bench-{i}", "method": "POST", "url": "/v1/chat/completions",
             "body": {"model": MODEL, "max_tokens": max_tokens, "temperature": 0.7, "seed": i,
                      "messages": [{"role": "user", "content": f"Tell a short story about the number {i}."}]}}
            for i in range(count)]


class InteractiveLoad:
    """`clients` threads, each streaming one chat after another (with a pause): time to first token of each."""

    def __init__(self, client: openai.OpenAI, clients: int, max_tokens: int, pause_s: float) -> None:
        self._client = client
        self._max_tokens = max_tokens
        self._pause = pause_s
        self._stop = threading.Event()
        self.ttfts: list[float] = []
        self.failures = 0
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(clients)]

    def __enter__(self) -> "InteractiveLoad":
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(300)

    def _run(self, worker: int) -> None:
        turn = 0
        while not self._stop.is_set():
            turn += 1
            started = time.perf_counter()
            try:
                stream = self._client.chat.completions.create(
                    model=MODEL, max_tokens=self._max_tokens, stream=True,
                    messages=[{"role": "user", "content": f"Client {worker}, turn {turn}: say something kind."}])
                first = None
                for chunk in stream:
                    if first is None and chunk.choices and chunk.choices[0].delta.content:
                        first = time.perf_counter() - started
                if first is not None:
                    self.ttfts.append(first)
            except openai.OpenAIError:
                self.failures += 1
            self._stop.wait(self._pause)


def interactive_alone(client: openai.OpenAI, args) -> tuple[float, int]:
    load = InteractiveLoad(client, args.interactive_clients, args.interactive_max_tokens, args.pause_s)
    with load:
        time.sleep(args.baseline_s)
    return statistics.median(load.ttfts), len(load.ttfts)


def as_interactive(client: openai.OpenAI, lines: list[dict], concurrency: int) -> tuple[float, int]:
    """The batch's requests sent as concurrent interactive requests: (completion tokens/s, tokens)."""
    def one(line: dict) -> int:
        reply = client.chat.completions.create(**line["body"])
        return reply.usage.completion_tokens

    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        tokens = sum(pool.map(one, lines))
    return tokens / (time.perf_counter() - started), tokens


def as_batch(client: openai.OpenAI, lines: list[dict], args) -> tuple[float, int, float, int, dict]:
    """The batch under the interactive load: (batch tokens/s, tokens, interactive TTFT p50, samples, counts)."""
    content = "\n".join(json.dumps(line) for line in lines).encode()
    source = client.files.create(file=("bench.jsonl", content), purpose="batch")
    load = InteractiveLoad(client, args.interactive_clients, args.interactive_max_tokens, args.pause_s)
    with load:
        # The load first, so the batch starts in the same conditions the baseline measured.
        time.sleep(min(5.0, args.baseline_s / 4))
        started = time.perf_counter()
        batch = client.batches.create(input_file_id=source.id, endpoint="/v1/chat/completions",
                                      completion_window="24h")
        while batch.status not in ("completed", "failed", "cancelled", "expired"):
            time.sleep(0.5)
            batch = client.batches.retrieve(batch.id)
        elapsed = time.perf_counter() - started
    if batch.status != "completed" or not batch.output_file_id:
        raise SystemExit(f"the batch did not complete: {batch}")
    output = [json.loads(line) for line in client.files.content(batch.output_file_id).text.splitlines() if line]
    tokens = sum(line["response"]["body"]["usage"]["completion_tokens"] for line in output)
    counts = {"completed": batch.request_counts.completed, "failed": batch.request_counts.failed}
    return tokens / elapsed, tokens, statistics.median(load.ttfts), len(load.ttfts), counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--max-tokens", type=int, default=64, help="per batch request")
    parser.add_argument("--interactive-clients", type=int, default=2)
    parser.add_argument("--interactive-max-tokens", type=int, default=32)
    parser.add_argument("--pause-s", type=float, default=1.0, help="between one client's interactive requests")
    parser.add_argument("--baseline-s", type=float, default=40.0, help="interactive load alone")
    parser.add_argument("--concurrency", type=int, default=8, help="of the interactive run of the batch's requests")
    parser.add_argument("--smoke", action="store_true", help="a few requests, short phases: checks the bench")
    args = parser.parse_args()
    if args.smoke:
        args.requests, args.max_tokens, args.baseline_s, args.interactive_max_tokens = 8, 8, 6.0, 8

    data_dir = pathlib.Path(tempfile.mkdtemp(prefix="clowder-bench-batch-"))
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "CLOWDER_ADMIN_TOKEN"}
    proc = subprocess.Popen([sys.executable, "-m", "clowder_cli.main", "--data-dir", str(data_dir), "up", "--demo",
                             "--http-port", str(port), "--internal-ports", "auto"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if "cluster up" in line:
                break
        else:
            raise SystemExit("clowder up exited before the cluster was up")
        threading.Thread(target=lambda: [None for _ in proc.stdout], daemon=True).start()
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", timeout=600, max_retries=0)
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=4)
        lines = requests_for(args.requests, args.max_tokens)

        ttft_alone, alone_samples = interactive_alone(client, args)
        interactive_tps, interactive_tokens = as_interactive(client, lines, args.concurrency)
        batch_tps, batch_tokens, ttft_with, with_samples, counts = as_batch(client, lines, args)
        result = {
            "batch_tokens_per_s": round(batch_tps, 2),
            "interactive_ttft_p50_ratio": round(ttft_with / ttft_alone, 3),
            "batch_vs_interactive_throughput": round(batch_tps / interactive_tps, 3),
            "interactive_ttft_p50_s_alone": round(ttft_alone, 4),
            "interactive_ttft_p50_s_with_batch": round(ttft_with, 4),
            "interactive_samples": [alone_samples, with_samples],
            "as_interactive_tokens_per_s": round(interactive_tps, 2),
            "tokens": {"batch": batch_tokens, "as_interactive": interactive_tokens},
            "batch_request_counts": counts,
            "requests": args.requests,
            "smoke": args.smoke,
        }
        print(json.dumps(result))
    finally:
        proc.terminate()
        try:
            proc.wait(120)
        except subprocess.TimeoutExpired:
            proc.kill()


if __name__ == "__main__":
    main()
