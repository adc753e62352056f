"""The gRPC InferenceService face: same routing core and errors as the HTTP API, protobuf chunks out."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import AsyncIterator

import grpc
from google.protobuf import json_format

from clowder.balancer.v1 import inference_pb2, inference_pb2_grpc
from clowder.runtime.v1 import runtime_pb2
from clowder_common.errors import HTTP_STATUS, ClowderError, InvalidArgument
from clowder_common.limits import MAX_CHOICES, MAX_EMBED_REQUEST_INPUTS

from clowder_balancer import logcontext, request_ids, traffic_split
from clowder_balancer.apikeys import Principal
from clowder_balancer.front_door import FrontDoor
from clowder_balancer.metrics import CLIENT_CLOSED, UNKNOWN_MODEL
from clowder_balancer.openai_api import ROLES
from clowder_balancer.openai_tools import name_tool_messages, parse_tools
from clowder_balancer.request_ids import HEADER as REQUEST_ID_HEADER
from clowder_balancer.middleware.base import RequestContext
from clowder_balancer.sampling import validate_sampling

log = logging.getLogger(__name__)

SERVICE_NAME = inference_pb2.DESCRIPTOR.services_by_name["InferenceService"].full_name


def _metadata(context: grpc.aio.ServicerContext, key: str) -> str:
    value = next((v for k, v in context.invocation_metadata() or () if k == key), "")
    return value.decode(errors="replace") if isinstance(value, bytes) else value


def _request_id(context: grpc.aio.ServicerContext) -> str:
    return request_ids.request_id(_metadata(context, REQUEST_ID_HEADER) or None)


def _validate_common(model: str, sampling: runtime_pb2.SamplingParams) -> None:
    if not model:
        raise InvalidArgument("model is required", field="model")
    validate_sampling(sampling, {f.name: f"sampling.{f.name}" for f in runtime_pb2.SamplingParams.DESCRIPTOR.fields})


def _validate_messages(messages) -> None:
    if not messages:
        raise InvalidArgument("messages must not be empty", field="messages")
    for i, message in enumerate(messages):
        if message.role not in ROLES:
            raise InvalidArgument(
                f"messages[{i}].role must be one of {sorted(ROLES)}", field=f"messages[{i}].role"
            )


def _normalized(message: runtime_pb2.ChatMessage) -> runtime_pb2.ChatMessage:
    out = runtime_pb2.ChatMessage()
    out.CopyFrom(message)
    out.role = ROLES[message.role]
    return out


def _validate_choices(n: int, sampling: runtime_pb2.SamplingParams) -> int:
    # top_logprobs is checked with the rest of sampling (validate_sampling).
    if n > MAX_CHOICES:
        raise InvalidArgument(f"n must be between 1 and {MAX_CHOICES}", field="n")
    return n or 1


def _validate_tools(request: inference_pb2.CreateChatCompletionRequest) -> None:
    """The same rules as the HTTP face's, on the Struct form."""
    names: set[str] = set()
    if request.tools:
        names = parse_tools([json_format.MessageToDict(t) for t in request.tools])[1]
    choice = request.tool_choice if request.HasField("tool_choice") else None
    if choice is None or choice.mode == runtime_pb2.ToolChoice.MODE_UNSPECIFIED:
        return
    if not request.tools:
        raise InvalidArgument("tool_choice is only allowed when tools are given", field="tool_choice")
    if choice.mode == runtime_pb2.ToolChoice.MODE_FUNCTION and choice.function_name not in names:
        raise InvalidArgument(f"tool_choice names no function of tools: {choice.function_name!r}",
                              field="tool_choice.function_name")
    if choice.mode not in runtime_pb2.ToolChoice.Mode.values():
        raise InvalidArgument("tool_choice.mode is not a known mode", field="tool_choice.mode")


class InferenceServicer(FrontDoor, inference_pb2_grpc.InferenceServiceServicer):
    def _principal(self, context: grpc.aio.ServicerContext) -> Principal:
        return self._caller(_metadata(context, "authorization"))

    def register(self, server: grpc.aio.Server) -> str:
        inference_pb2_grpc.add_InferenceServiceServicer_to_server(self, server)
        return SERVICE_NAME

    async def ListModels(self, request, context) -> inference_pb2.ListModelsResponse:
        self._principal(context)
        return inference_pb2.ListModelsResponse(
            models=[
                inference_pb2.Model(id=m.name, created=m.created, ready_replicas=m.ready_replicas)
                for m in self._discovery.models()
            ]
        )

    async def CreateChatCompletion(self, request, context) -> AsyncIterator[inference_pb2.CreateChatCompletionResponse]:
        _validate_common(request.model, request.sampling)
        _validate_messages(request.messages)
        n = _validate_choices(request.n, request.sampling)
        _validate_tools(request)
        generate = runtime_pb2.GenerateRequest(sampling=request.sampling)
        generate.chat.messages.extend(_normalized(m) for m in request.messages)
        name_tool_messages(generate.chat.messages)
        generate.chat.tools.extend(request.tools)
        if request.HasField("tool_choice"):
            generate.chat.tool_choice.CopyFrom(request.tool_choice)
        async for index, message, cid, created in self._stream(request.model, generate, n, "chatcmpl-", context):
            yield inference_pb2.CreateChatCompletionResponse(
                id=cid, model=request.model, created=created, delta=message.text,
                finish_reason=message.finish_reason,
                usage=message.usage if message.HasField("usage") else None,
                index=index, logprobs=message.logprobs, tool_calls=message.tool_calls,
            )

    async def CreateCompletion(self, request, context) -> AsyncIterator[inference_pb2.CreateCompletionResponse]:
        _validate_common(request.model, request.sampling)
        n = _validate_choices(request.n, request.sampling)
        generate = runtime_pb2.GenerateRequest(prompt=request.prompt, sampling=request.sampling)
        async for index, message, cid, created in self._stream(request.model, generate, n, "cmpl-", context):
            yield inference_pb2.CreateCompletionResponse(
                id=cid, model=request.model, created=created, text=message.text,
                finish_reason=message.finish_reason,
                usage=message.usage if message.HasField("usage") else None,
                index=index, logprobs=message.logprobs,
            )

    async def CreateEmbedding(self, request, context) -> inference_pb2.CreateEmbeddingResponse:
        if not request.model:
            raise InvalidArgument("model is required", field="model")
        if not request.inputs:
            raise InvalidArgument("inputs must not be empty", field="inputs")
        if len(request.inputs) > MAX_EMBED_REQUEST_INPUTS:
            raise InvalidArgument(f"inputs takes at most {MAX_EMBED_REQUEST_INPUTS} texts", field="inputs")
        for i, text in enumerate(request.inputs):
            if not text:
                raise InvalidArgument(f"inputs[{i}] must not be empty", field=f"inputs[{i}]")
        rid = _request_id(context)
        logcontext.REQUEST_ID.set(rid)
        await context.send_initial_metadata(((REQUEST_ID_HEADER, rid),))
        model_label = UNKNOWN_MODEL
        status = 500
        try:
            if self._discovery.has_model(request.model):
                model_label = request.model
            ctx = RequestContext(rid, request.model, "grpc", self._principal(context))
            result = await self._pipeline.embed(ctx, runtime_pb2.EmbedRequest(request_id=rid, inputs=request.inputs))
            status = 200
            return inference_pb2.CreateEmbeddingResponse(model=request.model, embeddings=result.embeddings,
                                                         prompt_tokens=result.prompt_tokens)
        except ClowderError as err:
            status = HTTP_STATUS.get(err.code, 500)
            log.info("request_id=%s model=%s embeddings failed: %s", rid, request.model, err.message)
            raise
        finally:
            self._metrics.request_done(model_label, "grpc", status)

    async def _stream(
        self, model: str, generate: runtime_pb2.GenerateRequest, n: int, id_prefix: str,
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[tuple[int, runtime_pb2.GenerateResponse, str, int]]:
        rid = _request_id(context)
        generate.request_id = rid
        logcontext.REQUEST_ID.set(rid)
        traffic_split.begin(_metadata(context, traffic_split.REVISION_HEADER))
        await context.send_initial_metadata(((REQUEST_ID_HEADER, rid),))
        model_label = UNKNOWN_MODEL
        status = 500
        cid, created = id_prefix + request_ids.new_id(), int(time.time())
        try:
            if self._discovery.has_model(model):
                model_label = model
            principal = self._principal(context)
            session = _metadata(context, self._session_header)[:256]
            ctx = RequestContext(rid, model, "grpc", principal)
            async with contextlib.aclosing(self._pipeline.generate(ctx, generate, session=session, n=n)) as stream:
                async for index, message in stream:
                    yield index, message, cid, created
            status = 200
        except ClowderError as err:
            status = HTTP_STATUS.get(err.code, 500)
            log.info("request_id=%s model=%s failed: %s", rid, model, err.message)
            raise
        except asyncio.CancelledError:
            status = CLIENT_CLOSED
            log.info("request_id=%s model=%s cancelled by the client", rid, model)
            raise
        finally:
            # The revision is chosen after the initial metadata left: it travels in the trailing metadata.
            context.set_trailing_metadata(tuple(traffic_split.response_headers().items()))
            self._metrics.request_done(model_label, "grpc", status)

