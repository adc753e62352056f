"""Server-sent events of an OpenAI stream, as a client reads them."""

from __future__ import annotations

import json


def sse_events(body: str) -> list[dict | str]:
    """The data of each server-sent event of an OpenAI stream: JSON objects, and the "[DONE]" marker as is."""
    out: list[dict | str] = []
    for block in body.split("\n\n"):
        if block.startswith("data: "):
            data = block.removeprefix("data: ")
            out.append(data if data == "[DONE]" else json.loads(data))
    return out
