"""Input files, polling and output checks shared by the batch tests."""

from __future__ import annotations

import json
import time

import openai

ENDED = ("completed", "failed", "cancelled", "expired")


def chat_lines(count: int, max_tokens: int = 8, model: str = "smol", prefix: str = "req") -> list[dict]:
    return [{"custom_id": f"{prefix}-{i}", "method": "POST", "url": "/v1/chat/completions",
             "body": {"model": model, "messages": [{"role": "user", "content": f"Write about the number {i}."}],
                      "max_tokens": max_tokens, "temperature": 0}}
            for i in range(count)]


def jsonl(lines: list[dict]) -> bytes:
    return "\n".join(json.dumps(line) for line in lines).encode() + b"\n"


def upload(client: openai.OpenAI, lines: list[dict], name: str = "input.jsonl"):
    return client.files.create(file=(name, jsonl(lines)), purpose="batch")


def poll(client: openai.OpenAI, batch_id: str, until, timeout: float, what: str = ""):
    """The batch once `until(batch)` holds; connection errors (a balancer restarting) are waited out."""
    deadline = time.monotonic() + timeout
    batch = None
    while time.monotonic() < deadline:
        try:
            batch = client.batches.retrieve(batch_id)
        except (openai.APIConnectionError, openai.InternalServerError):
            time.sleep(0.5)
            continue
        if until(batch):
            return batch
        time.sleep(0.3)
    raise AssertionError(f"batch {batch_id} not {what or 'as expected'} within {timeout}s: {batch}")


def ended(client: openai.OpenAI, batch_id: str, timeout: float = 240):
    return poll(client, batch_id, lambda b: b.status in ENDED, timeout, "ended")


def lines_of(client: openai.OpenAI, file_id: str | None) -> list[dict]:
    if not file_id:
        return []
    return [json.loads(line) for line in client.files.content(file_id).text.splitlines() if line.strip()]


def custom_ids(lines: list[dict]) -> list[str]:
    return [line["custom_id"] for line in lines]
