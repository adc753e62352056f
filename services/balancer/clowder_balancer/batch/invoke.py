"""One batch line as one request through the balancer's pipeline (keys, groups, middleware, routing, usage)."""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Any

from clowder.runtime.v1 import runtime_pb2
from clowder_common.errors import ClowderError

from clowder_balancer import openai_api
from clowder_balancer.apikeys import Principal
from clowder_balancer.discovery import Discovery
from clowder_balancer.metrics import UNKNOWN_MODEL, Metrics
from clowder_balancer.middleware.base import RequestContext
from clowder_balancer.openai_embeddings import embedding_response, parse_embedding_request
from clowder_balancer.pipeline import Pipeline
from clowder_balancer.batch.validation import Kind

log = logging.getLogger(__name__)

# The `api` label of batch invocations in metrics, and what middleware sees as RequestContext.api.
API = "batch"


class Invoker:
    def __init__(self, pipeline: Pipeline, discovery: Discovery, metrics: Metrics) -> None:
        self._pipeline = pipeline
        self._discovery = discovery
        self._metrics = metrics

    async def invoke(self, kind: Kind, body: dict[str, Any], principal: Principal, request_id: str
                     ) -> tuple[int, dict[str, Any]]:
        """(HTTP status, response body) of the request an interactive client would have got."""
        model = str(body.get("model", ""))
        label = model if self._discovery.has_model(model) else UNKNOWN_MODEL
        status = 500
        try:
            if kind == "embeddings":
                status, out = 200, await self._embed(body, principal, request_id)
            else:
                status, out = 200, await self._generate(kind, body, principal, request_id)
            return status, out
        except ClowderError as err:
            status, out = openai_api.error_from(err, embeddings=kind == "embeddings")
            return status, out
        finally:
            self._metrics.request_done(label, API, status)

    async def _embed(self, body: dict[str, Any], principal: Principal, rid: str) -> dict[str, Any]:
        parsed = parse_embedding_request(body)
        ctx = RequestContext(rid, parsed.model, API, principal)
        result = await self._pipeline.embed(ctx, runtime_pb2.EmbedRequest(request_id=rid, inputs=parsed.inputs))
        return embedding_response(parsed.model, result.embeddings, result.prompt_tokens, parsed.encoding_format)

    async def _generate(self, kind: Kind, body: dict[str, Any], principal: Principal, rid: str) -> dict[str, Any]:
        assert kind != "embeddings"
        parsed = openai_api.parse_request(body, kind)
        ctx = RequestContext(rid, parsed.model, API, principal)
        request = parsed.generate_request(rid)
        # The replica admits interactive requests first and may preempt this one for them (it resumes where
        # it stopped); the pipeline passes the field on as it is, to every choice and continuation.
        request.priority = runtime_pb2.PRIORITY_BATCH
        stream = self._pipeline.generate(ctx, request, n=parsed.n)
        async with contextlib.aclosing(stream):
            return await openai_api.collect_completion(parsed, int(time.time()), stream)


def retryable(status: int) -> bool:
    """Outcomes that say nothing about the request itself (no replica yet, a replica died, overload)."""
    return status in (429, 500, 502, 503, 504)
