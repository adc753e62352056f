"""One request end to end, shared by both API faces: authenticate, run the aimage's middleware, route, filter."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import AsyncIterator

from clowder.runtime.v1 import runtime_pb2
from clowder_common.errors import HTTP_STATUS, ClowderError

from clowder_balancer.discovery import Discovery
from clowder_balancer.metrics import CLIENT_CLOSED
from clowder_balancer.middleware.base import RequestContext
from clowder_balancer.middleware.chain import Chains
from clowder_balancer.openai_api import finish_reason_name
from clowder_balancer.router import Router

log = logging.getLogger(__name__)

# Output kept for audit and webhooks, per request.
MAX_KEPT_OUTPUT = 64 * 1024


class Pipeline:
    def __init__(self, router: Router, discovery: Discovery) -> None:
        self._router = router
        self._discovery = discovery
        self.chains = Chains()

    async def generate(
        self, ctx: RequestContext, request: runtime_pb2.GenerateRequest, session: str = ""
    ) -> AsyncIterator[runtime_pb2.GenerateResponse]:
        """The router's stream for `request` after the model's middleware; texts pass the output filters."""
        stages = []
        if self._discovery.has_model(ctx.model):
            stages = self.chains.stages(ctx.model, self._discovery.image_configuration(ctx.model))
        ctx.request = request
        kept = 0
        try:
            for stage in stages:
                await stage.before(ctx, request)
            filters = [f for f in (s.output_filter(ctx) for s in stages) if f is not None]
            async with contextlib.aclosing(self._router.generate(ctx.model, request, session=session)) as stream:
                async for message in stream:
                    text = message.text
                    last = message.finish_reason != runtime_pb2.FINISH_REASON_UNSPECIFIED
                    if filters:
                        text = _through(filters, text, last)
                    if kept < MAX_KEPT_OUTPUT:
                        ctx.output.append(text[: MAX_KEPT_OUTPUT - kept])
                        kept += len(text)
                    if last:
                        ctx.prompt_tokens = message.usage.prompt_tokens
                        ctx.completion_tokens = message.usage.completion_tokens
                        ctx.finish_reason = finish_reason_name(message.finish_reason) or ""
                        # Served: a consumer that stops reading after this message has not cut anything.
                        ctx.status = 200
                    if text != message.text:
                        replaced = runtime_pb2.GenerateResponse()
                        replaced.CopyFrom(message)
                        replaced.text = text
                        message = replaced
                    yield message
            ctx.status = 200
        except ClowderError as err:
            ctx.status, ctx.error = HTTP_STATUS.get(err.code, 500), err.message
            raise
        except (asyncio.CancelledError, GeneratorExit):
            if not ctx.status:
                ctx.status, ctx.error = CLIENT_CLOSED, "client closed the request"
            raise
        except Exception:
            ctx.status = ctx.status or 500
            raise
        finally:
            for stage in stages:
                try:
                    stage.after(ctx)
                except Exception as exc:  # an observer's bug must not turn a served request into an error
                    log.warning("request_id=%s middleware %s after() failed: %s", ctx.request_id, stage.name, exc)

    async def drain(self) -> None:
        """Let background middleware work (audit lines, webhooks) finish, bounded by each stage's timeout."""
        for stage in self.chains.all_stages():
            drain = getattr(stage, "drain", None)
            if drain is not None:
                await drain()


def _through(filters, text: str, last: bool) -> str:
    for f in filters:
        text = f.feed(text)
        if last:
            text += f.flush()
    return text
