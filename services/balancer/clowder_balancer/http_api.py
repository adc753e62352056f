"""The OpenAI-compatible HTTP face (aiohttp): /v1/models, /v1/chat/completions, /v1/completions, /v1/embeddings,
health, metrics."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from typing import AsyncIterator

from aiohttp import web

from clowder.runtime.v1 import runtime_pb2
from clowder_common.errors import HTTP_STATUS, ClowderError

from clowder_balancer import logcontext, openai_api, request_ids, traffic_split
from clowder_balancer.apikeys import ApiKeyStore, Principal
from clowder_balancer.discovery import Discovery, model_not_found
from clowder_balancer.front_door import FrontDoor
from clowder_balancer.metrics import CLIENT_CLOSED, UNKNOWN_MODEL, Metrics
from clowder_balancer.openai_api import Kind, OpenAIRequest
from clowder_balancer.openai_embeddings import embedding_response, parse_embedding_request
from clowder_balancer.openai_logprobs import LegacyLogprobs, chat_logprobs
from clowder_balancer.openai_tools import tool_calls_out
from clowder_balancer.request_ids import HEADER as REQUEST_ID_HEADER
from clowder_balancer.middleware.base import RequestContext
from clowder_balancer.pipeline import Pipeline
from clowder_balancer.router import Router

log = logging.getLogger(__name__)

REQUEST_ID = web.RequestKey("request_id", str)


def json_error(status: int, message: str, param: str | None = None, code: str | None = None) -> web.Response:
    return web.json_response(openai_api.error_body(status, message, param, code), status=status)


def _error_response(err: ClowderError, embeddings: bool = False) -> web.Response:
    status, body = openai_api.error_from(err, embeddings)
    response = web.json_response(body, status=status)
    if err.retry_after is not None and status in (429, 503):
        response.headers["Retry-After"] = str(max(1, round(err.retry_after)))
    return response


class HttpApi(FrontDoor):
    def __init__(self, router: Router, discovery: Discovery, metrics: Metrics, max_body_bytes: int,
                 session_header: str = "x-session-id", pipeline: Pipeline | None = None,
                 keys: ApiKeyStore | None = None, require_api_keys: bool = False) -> None:
        super().__init__(router, discovery, metrics, session_header, pipeline, keys, require_api_keys)
        self._max_body_bytes = max_body_bytes

    def application(self) -> web.Application:
        app = web.Application(client_max_size=self._max_body_bytes, middlewares=[self._middleware])
        app.router.add_get("/v1/models", self._list_models)
        app.router.add_get("/v1/models/{model}", self._get_model)
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_post("/v1/completions", self._completions)
        app.router.add_post("/v1/embeddings", self._embeddings)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/metrics", self._metrics_text)
        return app

    # -- cross-cutting ---------------------------------------------------------------------------

    @web.middleware
    async def _middleware(self, request: web.Request, handler) -> web.StreamResponse:
        """Request ids on every response, and every error in OpenAI's shape."""
        rid = request_ids.request_id(request.headers.get(REQUEST_ID_HEADER))
        request[REQUEST_ID] = rid
        # Each aiohttp request runs in its own task: setting the variable here scopes it to this request.
        logcontext.REQUEST_ID.set(rid)
        traffic_split.begin(request.headers.get(traffic_split.REVISION_HEADER))
        started = time.monotonic()
        try:
            response = await handler(request)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            response = self._http_exception(request, exc)
        except ClowderError as err:
            response = _error_response(err)
        except asyncio.CancelledError:
            log.info("request_id=%s %s %s cancelled: client went away", rid, request.method, request.path)
            raise
        except Exception as exc:
            incident = uuid.uuid4().hex[:12]
            log.error("request_id=%s unhandled error (incident %s)", rid, incident, exc_info=exc)
            response = json_error(500, f"internal error (incident {incident})", code="internal")
        if not response.prepared:
            response.headers[REQUEST_ID_HEADER] = rid
            response.headers.update(traffic_split.response_headers())
        level = logging.DEBUG if request.path in ("/healthz", "/metrics") else logging.INFO
        log.log(level, "request_id=%s %s %s status=%s duration_s=%.3f replica=%s", rid, request.method, request.path,
                response.status, time.monotonic() - started, logcontext.REPLICA.get() or "-")
        return response

    @staticmethod
    def _http_exception(request: web.Request, exc: web.HTTPException) -> web.Response:
        if exc.status == 404:
            return json_error(404, f"Invalid URL ({request.method} {request.path})", code="unknown_url")
        if exc.status == 405:
            return json_error(405, f"Method {request.method} is not allowed on {request.path}",
                              code="method_not_allowed")
        if exc.status == 413:
            return json_error(413, exc.text or "Request body too large", code="request_too_large")
        return json_error(exc.status, exc.text or exc.reason)

    def _principal(self, request: web.Request) -> Principal:
        """Who is calling /v1/*: Unauthenticated (401) for a bad key, or for none when keys are required."""
        return self._caller(request.headers.get("Authorization"))

    # -- plain endpoints ---------------------------------------------------------------------------

    async def _healthz(self, request: web.Request) -> web.Response:
        if not self._discovery.ready:
            return json_error(503, "service discovery has not loaded the cluster state yet", code="not_ready")
        return web.json_response({"status": "ok"})

    async def _metrics_text(self, request: web.Request) -> web.Response:
        response = web.Response(body=self._metrics.render())
        response.headers["Content-Type"] = self._metrics.content_type
        return response

    @staticmethod
    def _model_object(name: str, created: int) -> dict:
        return {"id": name, "object": "model", "created": created, "owned_by": "clowder"}

    async def _list_models(self, request: web.Request) -> web.Response:
        self._principal(request)
        data = [self._model_object(m.name, m.created) for m in self._discovery.models()]
        return web.json_response({"object": "list", "data": data})

    async def _get_model(self, request: web.Request) -> web.Response:
        self._principal(request)
        name = request.match_info["model"]
        for model in self._discovery.models():
            if model.name == name:
                return web.json_response(self._model_object(model.name, model.created))
        raise model_not_found(name)

    # -- inference -------------------------------------------------------------------------------

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        return await self._inference(request, "chat")

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        return await self._inference(request, "completion")

    async def _inference(self, request: web.Request, kind: Kind) -> web.StreamResponse:
        rid = request[REQUEST_ID]
        model_label = UNKNOWN_MODEL
        status = 500
        try:
            principal = self._principal(request)
            parsed = openai_api.parse_request(openai_api.decode_body(await request.read()), kind)
            if self._discovery.has_model(parsed.model):
                model_label = parsed.model
            session = request.headers.get(self._session_header, "")[:256]
            ctx = RequestContext(rid, parsed.model, "http", principal)
            stream = self._pipeline.generate(ctx, parsed.generate_request(rid), session=session, n=parsed.n)
            async with contextlib.aclosing(stream):
                if parsed.stream:
                    response, status = await self._stream(request, parsed, stream)
                else:
                    response = await self._collect(parsed, stream)
                    status = response.status
                return response
        except ClowderError as err:
            status = HTTP_STATUS.get(err.code, 500)
            raise
        except web.HTTPException as exc:
            status = exc.status
            raise
        except asyncio.CancelledError:
            status = CLIENT_CLOSED
            raise
        finally:
            self._metrics.request_done(model_label, "http", status)

    async def _collect(
        self, parsed: OpenAIRequest, stream: AsyncIterator[tuple[int, runtime_pb2.GenerateResponse]]
    ) -> web.Response:
        return web.json_response(await openai_api.collect_completion(parsed, int(time.time()), stream))

    async def _stream(
        self, request: web.Request, parsed: OpenAIRequest,
        stream: AsyncIterator[tuple[int, runtime_pb2.GenerateResponse]],
    ) -> tuple[web.StreamResponse, int]:
        """Relay as SSE. Errors before the first token still get their own status; later ones an error event."""
        rid = request[REQUEST_ID]
        # Waiting for the first message before sending headers lets a 404/503/400 be a real HTTP error.
        index, message = await anext(stream)
        response = _SseResponse(status=200, headers={**_SSE_HEADERS, REQUEST_ID_HEADER: rid,
                                                     **traffic_split.response_headers()})
        await response.prepare(request)
        chunks = _ChunkWriter(parsed, openai_api.completion_id(parsed.kind), int(time.time()))
        try:
            # One write per runtime message: every write is a send(2), and on small chunks the
            # syscalls are most of what the balancer adds to a stream.
            pending: list[bytes] = chunks.opening()
            usages: dict[int, runtime_pb2.Usage] = {}
            try:
                while True:
                    chunks.message(pending, index, message)
                    if message.finish_reason:
                        usages[index] = message.usage
                        if len(usages) == parsed.n:
                            if parsed.include_usage:
                                # In choice order: the first choice's prompt figures are the ones that count.
                                total = openai_api.total_usage([usages[i] for i in sorted(usages)])
                                pending.append(chunks.usage(total))
                            break
                    if pending:
                        await response.write(b"".join(pending))
                        pending.clear()
                    index, message = await anext(stream)
                status = 200
            except ClowderError as err:
                # Headers are gone: the client learns of the failure in-band, as OpenAI does.
                status, body = openai_api.error_from(err)
                log.warning("request_id=%s stream broke after the first token: %s", rid, err.message)
                pending.append(openai_api.sse_event(body))
            pending.append(openai_api.SSE_DONE)
            # The last events and the end of the chunked body in one send.
            await response.write_eof(b"".join(pending))
        except ConnectionError:
            # The client hung up between chunks; leaving lets aclosing() cancel the runtime call.
            log.info("request_id=%s client went away mid-stream", rid)
            status = CLIENT_CLOSED
        return response, status

    # -- embeddings ------------------------------------------------------------------------------

    async def _embeddings(self, request: web.Request) -> web.Response:
        rid = request[REQUEST_ID]
        model_label = UNKNOWN_MODEL
        status = 500
        try:
            principal = self._principal(request)
            parsed = parse_embedding_request(openai_api.decode_body(await request.read()))
            if self._discovery.has_model(parsed.model):
                model_label = parsed.model
            ctx = RequestContext(rid, parsed.model, "http", principal)
            result = await self._pipeline.embed(ctx, runtime_pb2.EmbedRequest(request_id=rid, inputs=parsed.inputs))
            status = 200
            return web.json_response(embedding_response(parsed.model, result.embeddings, result.prompt_tokens,
                                                        parsed.encoding_format))
        except ClowderError as err:
            # Answered here: the params of an embeddings request are not those of a generation.
            response = _error_response(err, embeddings=True)
            status = response.status
            return response
        except asyncio.CancelledError:
            status = CLIENT_CLOSED
            raise
        finally:
            self._metrics.request_done(model_label, "http", status)


class _SseResponse(web.StreamResponse):
    """A stream whose headers leave with its first events: one send(2), one wake-up of the client, less on
    the way to the first token (aiohttp buffers them so when asked; without the knob they go at once)."""

    _send_headers_immediately = False


_SSE_HEADERS = {
    "Content-Type": "text/event-stream; charset=utf-8",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",
}


class _ChunkWriter:
    """SSE events of one streamed request: the opening role chunks, one or more per runtime message, usage."""

    def __init__(self, parsed: OpenAIRequest, cid: str, created: int) -> None:
        self._parsed = parsed
        self._chat = parsed.kind == "chat"
        self._cid, self._created, self._model = cid, created, parsed.model
        self._usage_too = parsed.include_usage
        self._legacy = [LegacyLogprobs() for _ in range(parsed.n)] if parsed.logprobs and not self._chat else None

    def _event(self, index: int, text: str | None, finish: str | None, logprobs=None, delta=None) -> bytes:
        if self._chat:
            if delta is None:
                delta = {"content": text} if text is not None else {}
            return openai_api.sse_event(openai_api.chat_chunk(
                self._cid, self._model, self._created, delta, finish, self._usage_too, index, logprobs))
        return openai_api.sse_event(openai_api.completion_chunk(
            self._cid, self._model, self._created, text or "", finish, self._usage_too, index, logprobs))

    def opening(self) -> list[bytes]:
        if not self._chat:
            return []
        return [self._event(i, None, None, delta={"role": "assistant", "content": ""}) for i in range(self._parsed.n)]

    def message(self, out: list[bytes], index: int, message: runtime_pb2.GenerateResponse) -> None:
        if message.text or message.logprobs:
            logprobs = None
            if message.logprobs:
                if self._chat:
                    logprobs = chat_logprobs(message.logprobs)
                elif self._legacy is not None:
                    logprobs = self._legacy[index].shape(message.logprobs)
            out.append(self._event(index, message.text, None, logprobs))
        if message.finish_reason:
            if message.tool_calls and self._chat:
                out.append(self._event(index, None, None,
                                       delta={"tool_calls": tool_calls_out(message.tool_calls, with_index=True)}))
            out.append(self._event(index, None, openai_api.finish_reason_name(message.finish_reason)))

    def usage(self, usage: runtime_pb2.Usage) -> bytes:
        return openai_api.sse_event(openai_api.usage_chunk(self._parsed.kind, self._cid, self._model,
                                                           self._created, usage))
