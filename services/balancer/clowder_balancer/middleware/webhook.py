"""Webhook: POSTs a JSON summary of each finished request to a URL, in the background with a bounded timeout."""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Mapping
from urllib.parse import urlsplit

import aiohttp

from clowder_balancer.middleware.base import BaseStage, RequestContext, bad_option, number, string
from clowder_balancer.middleware.redaction import redact

log = logging.getLogger(__name__)

# Posts in flight per stage; beyond this new events are dropped (a slow receiver must not pile up memory).
MAX_PENDING = 256


class WebhookStage(BaseStage):
    """Options: url (http or https, required), timeout_s (default 2, at most 30), include_content (default false)."""

    name = "webhook"

    def __init__(self, options: Mapping[str, Any]) -> None:
        self.url = string(options, "url", self.name)
        if urlsplit(self.url).scheme not in ("http", "https") or not urlsplit(self.url).netloc:
            raise bad_option(self.name, "'url' must be an http(s) URL")
        self.timeout = number(options, "timeout_s", self.name, 2.0, 0.1, 30.0)
        self.include_content = bool(options.get("include_content", False))
        self.pending: set[asyncio.Task] = set()
        self.failures = 0
        self.dropped = 0

    def payload(self, ctx: RequestContext) -> dict[str, Any]:
        body: dict[str, Any] = {
            "event": "request.finished",
            "request_id": ctx.request_id,
            "model": ctx.model,
            "api_key_id": ctx.principal.key_id or None,
            "status": ctx.status,
            "finish_reason": ctx.finish_reason or None,
            "prompt_tokens": ctx.prompt_tokens,
            "completion_tokens": ctx.completion_tokens,
            "time": ctx.started,
        }
        if self.include_content:
            body["output"] = ctx.output_text
            if ctx.choices:
                body["choices"] = ctx.choice_records()
        return redact(body)

    def after(self, ctx: RequestContext) -> None:
        if len(self.pending) >= MAX_PENDING:
            self.dropped += 1
            return
        task = asyncio.get_running_loop().create_task(self._post(self.payload(ctx)))
        self.pending.add(task)
        task.add_done_callback(self.pending.discard)

    async def _post(self, body: dict[str, Any]) -> None:
        try:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout)) as session:
                async with session.post(self.url, json=body) as resp:
                    if resp.status >= 400:
                        raise aiohttp.ClientResponseError(resp.request_info, (), status=resp.status)
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            self.failures += 1
            # The URL may carry credentials: name the host only.
            log.warning("webhook to %s failed: %s", urlsplit(self.url).hostname, type(exc).__name__)

    async def drain(self) -> None:
        if self.pending:
            await asyncio.wait(list(self.pending), timeout=self.timeout + 1)
