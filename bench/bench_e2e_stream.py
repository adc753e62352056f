"""End to end: time from `clowder up --demo` to the first streamed token, and one stream's tokens/s
through the balancer against llama-cpp-python called directly on the same prompt.

Both measured in this run on this machine; the last line is JSON.
"""

from __future__ import annotations

import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

import openai

from clowder_cli.bundled import bundled_model_path
from clowder_common.processes import free_port

PROMPT = [{"role": "user", "content": "Write a long story about a cat who learns to fly."}]
MAX_TOKENS = 200
ROUNDS = 3


def direct_tokens_per_second(llm) -> float:
    first = None
    tokens = 0
    for chunk in llm.create_chat_completion(messages=PROMPT, max_tokens=MAX_TOKENS, temperature=0, stream=True):
        if chunk["choices"][0]["delta"].get("content"):
            tokens += 1
            if first is None:
                first = time.perf_counter()
    end = time.perf_counter()
    return (tokens - 1) / (end - first)


def cluster_tokens_per_second(client: openai.OpenAI) -> tuple[float, int]:
    stream = client.chat.completions.create(model="smol", messages=PROMPT, max_tokens=MAX_TOKENS, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    first = None
    chunks = 0
    usage = None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        if chunk.choices and chunk.choices[0].delta.content:
            chunks += 1
            if first is None:
                first = time.perf_counter()
    end = time.perf_counter()
    tokens = usage.completion_tokens if usage else chunks
    return (tokens - 1) / (end - first), tokens


def main() -> None:
    import llama_cpp

    data_dir = pathlib.Path(tempfile.mkdtemp(prefix="clowder-bench-"))
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "CLOWDER_ADMIN_TOKEN"}
    t0 = time.perf_counter()
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
        ready = time.perf_counter() - t0
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", timeout=300)
        stream = client.chat.completions.create(model="smol", messages=[{"role": "user", "content": "Hi"}],
                                                max_tokens=4, stream=True)
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                break
        first_token = time.perf_counter() - t0
        for _ in stream:
            pass

        llm = llama_cpp.Llama(model_path=str(bundled_model_path()), n_ctx=2048, n_threads=os.cpu_count(),
                              verbose=False)
        direct, through = [], []
        for _ in range(ROUNDS):  # interleaved, so machine noise hits both alike
            direct.append(direct_tokens_per_second(llm))
            tps, _ = cluster_tokens_per_second(client)
            through.append(tps)
        del llm
    finally:
        subprocess.run([sys.executable, "-m", "clowder_cli.main", "--data-dir", str(data_dir), "down"],
                       capture_output=True, timeout=120)
        proc.wait(120)
    d, c = statistics.median(direct), statistics.median(through)
    print(f"clowder up --demo -> cluster up:          {ready:6.2f} s")
    print(f"clowder up --demo -> first streamed token: {first_token:6.2f} s")
    print(f"direct llama-cpp-python, 1 stream:         {d:6.1f} tokens/s (baseline, median of {ROUNDS})")
    print(f"through the balancer, 1 stream:            {c:6.1f} tokens/s ({c / d:.2f}x)")
    print(json.dumps({"up_to_ready_s": round(ready, 2), "up_to_first_token_s": round(first_token, 2),
                      "direct_tokens_per_s": round(d, 1), "balancer_tokens_per_s": round(c, 1),
                      "balancer_vs_direct_ratio": round(c / d, 3)}))


if __name__ == "__main__":
    main()
