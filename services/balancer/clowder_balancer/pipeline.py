"""One request end to end, shared by both API faces: authenticate, run the aimage's middleware, route, filter."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator
from typing import cast

from clowder.runtime.v1 import runtime_pb2
from clowder_common.errors import HTTP_STATUS, ClowderError, InvalidArgument

from clowder_balancer.choices import choice_requests, generate_choices
from clowder_balancer.discovery import Discovery
from clowder_balancer.metrics import CLIENT_CLOSED
from clowder_balancer.middleware.base import RequestContext, Stage
from clowder_balancer.middleware.chain import Chains
from clowder_balancer.openai_api import finish_reason_name
from clowder_balancer.router import Router
from clowder_balancer.tenancy.gate import Tenancy, Ticket

log = logging.getLogger(__name__)

# A choice's (index, message) pair, as several choices stream them.
_Pair = tuple[int, runtime_pb2.GenerateResponse]
# Output kept for audit and webhooks, per request (all choices together).
MAX_KEPT_OUTPUT = 64 * 1024


class Pipeline:
    def __init__(self, router: Router, discovery: Discovery, tenancy: Tenancy | None = None) -> None:
        self._router = router
        self._discovery = discovery
        # Limits, budgets, fair queueing and usage (tenancy/); None: none of them (in-process tests).
        self._tenancy = tenancy
        self.chains = Chains(tenancy.limiter if tenancy is not None else None)

    def _stages(self, model: str) -> list[Stage]:
        if not self._discovery.has_model(model):
            return []
        return self.chains.stages(model, self._discovery.image_configuration(model))

    async def generate(
        self, ctx: RequestContext, request: runtime_pb2.GenerateRequest, session: str = "", n: int = 1
    ) -> AsyncGenerator[tuple[int, runtime_pb2.GenerateResponse], None]:
        """(choice index, message) pairs of the router's streams for `request` (n choices of it) after the
        model's middleware; texts and tool calls pass the output filters."""
        stages = self._stages(ctx.model)
        ctx.request = request
        kept = 0
        finished = 0
        ticket: Ticket | None = None
        try:
            for stage in stages:
                await stage.before(ctx, request)
            if self._tenancy is not None:
                ticket = await self._tenancy.admit(ctx, request, n)
            filters = [[f for f in (s.output_filter(ctx) for s in stages) if f is not None] for _ in range(n)]
            if filters[0] and request.sampling.logprobs:
                # Token texts would show what the filters hold back from the text.
                raise InvalidArgument(f"logprobs are not available for model '{ctx.model}': its output is filtered",
                                      field="logprobs", reason="LOGPROBS_UNAVAILABLE")
            # One choice: the router's own stream, one generator layer less for every message.
            stream = (self._router.generate(ctx.model, request, session=session) if n == 1 else
                      generate_choices(self._router, ctx.model, choice_requests(request, n), session=session))
            async with contextlib.aclosing(stream):
                async for item in stream:
                    index, message = (0, cast(runtime_pb2.GenerateResponse, item)) if n == 1 else cast(_Pair, item)
                    text = message.text
                    last = message.finish_reason != runtime_pb2.FINISH_REASON_UNSPECIFIED
                    if filters[index]:
                        text = _through(filters[index], text, last)
                    if kept < MAX_KEPT_OUTPUT and text:
                        piece = text[: MAX_KEPT_OUTPUT - kept]
                        kept += len(piece)
                        if index == 0:
                            ctx.output.append(piece)
                        if n > 1:
                            ctx.choices.setdefault(index, ("", []))[1].append(piece)
                    if last:
                        if finished == 0:
                            ctx.prompt_tokens = message.usage.prompt_tokens
                        ctx.completion_tokens += message.usage.completion_tokens
                        reason = finish_reason_name(message.finish_reason) or ""
                        if index == 0:
                            ctx.finish_reason = reason
                        if n > 1:
                            ctx.choices[index] = (reason, ctx.choices.get(index, ("", []))[1])
                        finished += 1
                        if finished == n:
                            # Served: a consumer that stops reading after this message has not cut anything.
                            ctx.status = 200
                    if text != message.text or (last and filters[index] and message.tool_calls):
                        replaced = runtime_pb2.GenerateResponse()
                        replaced.CopyFrom(message)
                        replaced.text = text
                        for call in replaced.tool_calls:
                            call.arguments = _through(
                                [f for f in (s.output_filter(ctx) for s in stages) if f is not None],
                                call.arguments, True)
                        message = replaced
                    if ticket is not None:
                        ticket.sent(index, message)
                    yield index, message
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
            if ticket is not None:
                ticket.close()
            self._after(ctx, stages)

    async def embed(self, ctx: RequestContext, request: runtime_pb2.EmbedRequest) -> runtime_pb2.EmbedResponse:
        """The runtime's embeddings for `request`, after the model's middleware (stages that apply to inputs)."""
        stages = self._stages(ctx.model)
        ctx.request = request
        ticket: Ticket | None = None
        try:
            for stage in stages:
                await stage.before_embed(ctx, request)
            if self._tenancy is not None:
                ticket = await self._tenancy.admit_embed(ctx, request)
            response = await self._router.embed(ctx.model, request)
            if ticket is not None:
                ticket.embedded(response.prompt_tokens)
            ctx.prompt_tokens = response.prompt_tokens
            ctx.status = 200
            return response
        except ClowderError as err:
            ctx.status, ctx.error = HTTP_STATUS.get(err.code, 500), err.message
            raise
        except asyncio.CancelledError:
            ctx.status, ctx.error = CLIENT_CLOSED, "client closed the request"
            raise
        except Exception:
            ctx.status = 500
            raise
        finally:
            if ticket is not None:
                ticket.close()
            self._after(ctx, stages)

    @staticmethod
    def _after(ctx: RequestContext, stages: list[Stage]) -> None:
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
