"""Checks an input file against its batch's endpoint before anything runs, the way OpenAI reports problems."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

from clowder.balancer.v1 import batch_pb2

Kind = Literal["chat", "completion", "embeddings"]

ENDPOINTS: dict[str, Kind] = {
    "/v1/chat/completions": "chat",
    "/v1/completions": "completion",
    "/v1/embeddings": "embeddings",
}
# OpenAI's bound on requests per batch.
MAX_LINES = 50_000
# A file with many bad lines reports this many; more would only bloat the batch object in etcd.
MAX_ERRORS = 100
MAX_CUSTOM_ID = 512


@dataclass(frozen=True)
class Line:
    """One request of a batch: its 0-based position among the file's requests, its custom_id and body."""

    index: int
    custom_id: str
    body: dict[str, Any]

    @property
    def model(self) -> str:
        return str(self.body.get("model", ""))


def _error(code: str, message: str, line: int = 0, param: str = "") -> batch_pb2.BatchError:
    return batch_pb2.BatchError(code=code, message=message, line=line, param=param)


def _check_line(raw: bytes, number: int, endpoint: str, seen: set[str], index: int
                ) -> tuple[Line | None, batch_pb2.BatchError | None]:
    try:
        item = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return None, _error("invalid_json_line", f"Line {number} is not valid JSON.", number)
    if not isinstance(item, dict):
        return None, _error("invalid_json_line", f"Line {number} is not a JSON object.", number)
    for name in ("custom_id", "method", "url", "body"):
        if name not in item or item[name] is None:
            return None, _error("missing_required_parameter", f"Line {number} has no '{name}'.", number, name)
    custom_id, method, url, body = item["custom_id"], item["method"], item["url"], item["body"]
    if not isinstance(custom_id, str) or not custom_id or len(custom_id) > MAX_CUSTOM_ID:
        return None, _error("invalid_custom_id", f"'custom_id' on line {number} must be a non-empty string of at "
                            f"most {MAX_CUSTOM_ID} characters.", number, "custom_id")
    if method != "POST":
        return None, _error("invalid_method", f"Line {number}: only the POST method is supported.", number, "method")
    if url != endpoint:
        return None, _error("mismatched_url", f"Line {number}: the url '{url}' does not match the batch's endpoint "
                            f"'{endpoint}'.", number, "url")
    if not isinstance(body, dict):
        return None, _error("invalid_body", f"Line {number}: 'body' must be a JSON object.", number, "body")
    if not isinstance(body.get("model"), str) or not body["model"]:
        return None, _error("missing_required_parameter", f"Line {number}: 'body.model' is required.", number,
                            "body.model")
    if body.get("stream"):
        return None, _error("invalid_body", f"Line {number}: streaming is not available in a batch.", number,
                            "body.stream")
    if custom_id in seen:
        return None, _error("duplicate_custom_id", f"The custom_id '{custom_id}' on line {number} is used on an "
                            "earlier line; each request needs its own.", number, "custom_id")
    seen.add(custom_id)
    return Line(index, custom_id, body), None


def parse_input(content: bytes, endpoint: str) -> tuple[list[Line], list[batch_pb2.BatchError]]:
    """The requests of `content` (JSONL) and the errors that fail the batch (none when it may run).

    Blank lines are skipped, as OpenAI does.
    """
    lines: list[Line] = []
    errors: list[batch_pb2.BatchError] = []
    seen: set[str] = set()
    for number, raw in enumerate(content.split(b"\n"), start=1):
        if not raw.strip():
            continue
        line, error = _check_line(raw, number, endpoint, seen, len(lines))
        if error is not None:
            if len(errors) < MAX_ERRORS:
                errors.append(error)
            continue
        assert line is not None
        lines.append(line)
        if len(lines) > MAX_LINES:
            return [], [_error("too_many_requests", f"A batch takes at most {MAX_LINES} requests.")]
    if not lines and not errors:
        errors.append(_error("empty_file", "The input file has no requests."))
    return lines, errors
