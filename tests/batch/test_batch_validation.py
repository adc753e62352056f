"""Input files checked against a batch's endpoint, and the OpenAI shapes of batches, files and result lines."""

from __future__ import annotations

import json

import pytest

from clowder.balancer.v1 import batch_pb2
from clowder_balancer.batch.shapes import batch_object, file_object, result_line
from clowder_balancer.batch.validation import MAX_LINES, parse_input

pytestmark = pytest.mark.unit

CHAT = "/v1/chat/completions"


def line(custom_id: str = "a", url: str = CHAT, **body) -> bytes:
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": url,
                       "body": {"model": "smol", "messages": [], **body}}).encode()


def codes(content: bytes, endpoint: str = CHAT) -> list[tuple[int, str, str]]:
    return [(e.line, e.code, e.param) for e in parse_input(content, endpoint)[1]]


def test_good_lines_keep_their_order_and_blank_lines_are_skipped():
    lines, errors = parse_input(line("x") + b"\n\n" + line("y") + b"\n", CHAT)
    assert errors == []
    assert [(l.index, l.custom_id, l.model) for l in lines] == [(0, "x", "smol"), (1, "y", "smol")]


@pytest.mark.parametrize("raw, expected", [
    (b"{oops", (1, "invalid_json_line", "")),
    (b"[1, 2]", (1, "invalid_json_line", "")),
    (json.dumps({"custom_id": "a", "method": "POST", "url": CHAT}).encode(), (1, "missing_required_parameter", "body")),
    (json.dumps({"custom_id": "", "method": "POST", "url": CHAT, "body": {}}).encode(),
     (1, "invalid_custom_id", "custom_id")),
    (json.dumps({"custom_id": "a", "method": "GET", "url": CHAT, "body": {}}).encode(),
     (1, "invalid_method", "method")),
    (line(url="/v1/embeddings"), (1, "mismatched_url", "url")),
    (json.dumps({"custom_id": "a", "method": "POST", "url": CHAT, "body": {"messages": []}}).encode(),
     (1, "missing_required_parameter", "body.model")),
    (json.dumps({"custom_id": "a", "method": "POST", "url": CHAT, "body": "text"}).encode(),
     (1, "invalid_body", "body")),
    (line(stream=True), (1, "invalid_body", "body.stream")),
])
def test_each_kind_of_bad_line_is_named_with_its_line_and_param(raw, expected):
    assert codes(raw) == [expected]


def test_duplicate_custom_id_names_the_later_line():
    assert codes(line("a") + b"\n" + line("b") + b"\n" + line("a")) == [(3, "duplicate_custom_id", "custom_id")]


def test_empty_file_and_too_many_lines_fail_as_a_whole():
    assert codes(b"\n \n") == [(0, "empty_file", "")]
    many = b"\n".join(line(f"c{i}") for i in range(MAX_LINES + 1))
    assert codes(many) == [(0, "too_many_requests", "")]


def test_batch_object_has_openai_nulls_and_statuses():
    batch = batch_pb2.Batch(id="batch_1", endpoint=CHAT, input_file_id="file-1", completion_window="24h",
                            status=batch_pb2.BATCH_STATUS_IN_PROGRESS, created_at=10, in_progress_at=11,
                            expires_at=20)
    batch.request_counts.total = 3
    shaped = batch_object(batch)
    assert shaped["object"] == "batch" and shaped["status"] == "in_progress"
    assert shaped["output_file_id"] is None and shaped["completed_at"] is None and shaped["errors"] is None
    assert shaped["request_counts"] == {"total": 3, "completed": 0, "failed": 0}
    batch.errors.add(code="mismatched_url", message="m", param="url", line=2)
    assert batch_object(batch)["errors"] == {"object": "list", "data": [
        {"code": "mismatched_url", "message": "m", "param": "url", "line": 2}]}


def test_file_object_and_result_lines():
    f = batch_pb2.BatchFile(id="file-1", bytes=5, created_at=3, filename="in.jsonl", purpose="batch")
    assert file_object(f) == {"id": "file-1", "object": "file", "bytes": 5, "created_at": 3, "filename": "in.jsonl",
                              "purpose": "batch", "status": "processed", "status_details": None, "expires_at": None}
    ran = batch_pb2.BatchResult(custom_id="a", id="batch_req_1", status_code=200, request_id="r",
                                body_json='{"object": "chat.completion"}')
    assert result_line(ran) == {"id": "batch_req_1", "custom_id": "a", "error": None, "response": {
        "status_code": 200, "request_id": "r", "body": {"object": "chat.completion"}}}
    expired = batch_pb2.BatchResult(custom_id="b", id="batch_req_2", error_code="batch_expired", error_message="late")
    assert result_line(expired) == {"id": "batch_req_2", "custom_id": "b", "response": None,
                                    "error": {"code": "batch_expired", "message": "late"}}
