"""Audit log: one JSON line per request (who, which model, what was asked and answered, outcome), secrets
redacted, appended by a single writer thread so lines never interleave and requests never wait on the disk."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import os
from typing import Any, Mapping

from google.protobuf import json_format

from clowder_balancer.middleware.base import BaseStage, RequestContext, number, string
from clowder_balancer.middleware.redaction import redact

log = logging.getLogger(__name__)


class AuditStage(BaseStage):
    """Options: path (JSONL file, required), include_content (default true), max_content_chars (default 4096)."""

    name = "audit"

    def __init__(self, options: Mapping[str, Any]) -> None:
        self.path = string(options, "path", self.name)
        self.include_content = bool(options.get("include_content", True))
        self.max_chars = int(number(options, "max_content_chars", self.name, 4096, 0, 1_000_000))
        self._writer = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="audit")
        self.pending: set[asyncio.Future] = set()

    def record(self, ctx: RequestContext) -> dict[str, Any]:
        entry: dict[str, Any] = {
            "time": ctx.started,
            "request_id": ctx.request_id,
            "model": ctx.model,
            "api": ctx.api,
            "api_key_id": ctx.principal.key_id or None,
            "status": ctx.status,
            "error": ctx.error or None,
            "finish_reason": ctx.finish_reason or None,
            "prompt_tokens": ctx.prompt_tokens,
            "completion_tokens": ctx.completion_tokens,
        }
        if self.include_content and ctx.request is not None:
            request = json_format.MessageToDict(ctx.request, preserving_proto_field_name=True)
            request.pop("request_id", None)
            entry["request"] = request
            entry["output"] = ctx.output_text[: self.max_chars]
            if ctx.choices:
                entry["choices"] = [{**c, "output": c["output"][: self.max_chars]} for c in ctx.choice_records()]
        return redact(entry)

    def _append(self, line: str) -> None:
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        with os.fdopen(fd, "a", encoding="utf-8") as fh:
            fh.write(line)

    def after(self, ctx: RequestContext) -> None:
        line = json.dumps(self.record(ctx), ensure_ascii=False, separators=(",", ":")) + "\n"
        future = asyncio.get_running_loop().run_in_executor(self._writer, self._append, line)
        self.pending.add(future)
        future.add_done_callback(self._done)

    def _done(self, future: asyncio.Future) -> None:
        self.pending.discard(future)
        if not future.cancelled() and future.exception() is not None:
            log.warning("audit log %s: cannot write: %s", self.path, future.exception())

    async def drain(self) -> None:
        if self.pending:
            await asyncio.wait(list(self.pending), timeout=5)
