"""OpenAI's object shapes for files, batches and the lines of output and error files (no I/O)."""

from __future__ import annotations

import json
from typing import Any

from clowder.balancer.v1 import batch_pb2

S = batch_pb2
STATUS_NAMES: dict[int, str] = {
    S.BATCH_STATUS_VALIDATING: "validating",
    S.BATCH_STATUS_FAILED: "failed",
    S.BATCH_STATUS_IN_PROGRESS: "in_progress",
    S.BATCH_STATUS_FINALIZING: "finalizing",
    S.BATCH_STATUS_COMPLETED: "completed",
    S.BATCH_STATUS_EXPIRED: "expired",
    S.BATCH_STATUS_CANCELLING: "cancelling",
    S.BATCH_STATUS_CANCELLED: "cancelled",
}
# Statuses after which nothing changes any more.
ENDED = frozenset({S.BATCH_STATUS_FAILED, S.BATCH_STATUS_COMPLETED, S.BATCH_STATUS_EXPIRED,
                   S.BATCH_STATUS_CANCELLED})


def _or_none(value: Any) -> Any:
    # OpenAI sends null, not 0 or "", for a time or id that is not set yet.
    return value or None


def file_object(f: batch_pb2.BatchFile) -> dict[str, Any]:
    return {
        "id": f.id,
        "object": "file",
        "bytes": f.bytes,
        "created_at": f.created_at,
        "filename": f.filename,
        "purpose": f.purpose,
        "status": "processed",
        "status_details": None,
        "expires_at": None,
    }


def batch_object(b: batch_pb2.Batch) -> dict[str, Any]:
    errors = None
    if b.errors:
        errors = {"object": "list", "data": [
            {"code": e.code, "message": e.message, "param": e.param or None, "line": e.line or None}
            for e in b.errors]}
    counts = b.request_counts
    return {
        "id": b.id,
        "object": "batch",
        "endpoint": b.endpoint,
        "errors": errors,
        "input_file_id": b.input_file_id,
        "completion_window": b.completion_window,
        "status": STATUS_NAMES.get(b.status, "failed"),
        "output_file_id": _or_none(b.output_file_id),
        "error_file_id": _or_none(b.error_file_id),
        "created_at": b.created_at,
        "in_progress_at": _or_none(b.in_progress_at),
        "expires_at": _or_none(b.expires_at),
        "finalizing_at": _or_none(b.finalizing_at),
        "completed_at": _or_none(b.completed_at),
        "failed_at": _or_none(b.failed_at),
        "expired_at": _or_none(b.expired_at),
        "cancelling_at": _or_none(b.cancelling_at),
        "cancelled_at": _or_none(b.cancelled_at),
        "request_counts": {"total": counts.total, "completed": counts.completed, "failed": counts.failed},
        "metadata": dict(b.metadata) if b.metadata else None,
    }


def result_line(result: batch_pb2.BatchResult) -> dict[str, Any]:
    """One line of an output or error file."""
    if not result.status_code:
        return {"id": result.id, "custom_id": result.custom_id, "response": None,
                "error": {"code": result.error_code, "message": result.error_message}}
    return {"id": result.id, "custom_id": result.custom_id,
            "response": {"status_code": result.status_code, "request_id": result.request_id,
                         "body": json.loads(result.body_json) if result.body_json else None},
            "error": None}


def jsonl(lines: list[dict[str, Any]]) -> bytes:
    return b"".join(json.dumps(line, ensure_ascii=False, separators=(",", ":")).encode() + b"\n" for line in lines)


def page(data: list[dict[str, Any]], has_more: bool) -> dict[str, Any]:
    return {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None, "has_more": has_more}
