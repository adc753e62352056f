"""RuntimeService: Generate as a server stream over whatever engine holds the model, and GetStats; AdapterService."""

from __future__ import annotations

from typing import AsyncIterator, Callable, Sequence

import grpc
from clowder.controller.v1 import resources_pb2
from clowder.runtime.v1 import adapters_pb2, adapters_pb2_grpc, runtime_pb2, runtime_pb2_grpc

from clowder_runtime.generation import Engine, FinishReason, TokenLogprob
from clowder_runtime.live_adapters import LiveAdapters
from clowder_runtime.validation import build_job, embed_inputs

_FINISH = {
    FinishReason.STOP: runtime_pb2.FINISH_REASON_STOP,
    FinishReason.LENGTH: runtime_pb2.FINISH_REASON_LENGTH,
    FinishReason.TOOL_CALLS: runtime_pb2.FINISH_REASON_TOOL_CALLS,
}


class RuntimeServicer(runtime_pb2_grpc.RuntimeServiceServicer):
    def __init__(self, engine: Engine, model_name: str, image_config: resources_pb2.ImageConfiguration,
                 adapters: Callable[[], Sequence[str]] | None = None) -> None:
        self._engine = engine
        # What GetStats lists (LiveAdapters.names: an adapter being unloaded is no longer listed); None: the
        # engine's own list.
        self._adapters = adapters
        self._model_name = model_name
        self._image_config = image_config

    async def Generate(
        self, request: runtime_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[runtime_pb2.GenerateResponse]:
        job = build_job(request, self._image_config)
        stream = await self._engine.generate(job)
        try:
            async for output in stream:
                response = runtime_pb2.GenerateResponse(
                    text=output.text, completion_tokens=output.completion_tokens, prompt_tokens=output.prompt_tokens)
                if output.logprobs:
                    response.logprobs.extend(_logprob_message(lp) for lp in output.logprobs)
                if output.finish is not None:
                    response.finish_reason = _FINISH[output.finish.reason]
                    response.usage.prompt_tokens = output.finish.prompt_tokens
                    response.usage.completion_tokens = output.finish.completion_tokens
                    response.usage.cached_prompt_tokens = output.finish.cached_prompt_tokens
                    response.tool_calls.extend(
                        runtime_pb2.ToolCall(id=c.id, name=c.name, arguments=c.arguments)
                        for c in output.finish.tool_calls
                    )
                yield response
        finally:
            # Reached on a normal end, on an error, and when the call is cancelled
            # (the client went away): the engine then stops at the next token.
            stream.cancel()

    async def Embed(
        self, request: runtime_pb2.EmbedRequest, context: grpc.aio.ServicerContext
    ) -> runtime_pb2.EmbedResponse:
        vectors, tokens = await self._engine.embed(embed_inputs(request))
        return runtime_pb2.EmbedResponse(
            embeddings=[runtime_pb2.Embedding(values=v) for v in vectors], prompt_tokens=tokens,
        )

    async def GetStats(
        self, request: runtime_pb2.GetStatsRequest, context: grpc.aio.ServicerContext
    ) -> runtime_pb2.GetStatsResponse:
        stats = self._engine.stats()
        return runtime_pb2.GetStatsResponse(
            num_requests_running=stats.running,
            num_requests_waiting=stats.waiting,
            kv_cache_usage_perc=stats.kv_cache_usage,
            requests_total=stats.requests_total,
            generation_tokens_total=stats.generation_tokens_total,
            prompt_tokens_total=stats.prompt_tokens_total,
            model=self._model_name,
            prefix_block_hashes=stats.prefix_block_hashes,
            prefix_block_tokens=stats.prefix_block_tokens,
            slots=stats.slots,
            cached_prompt_tokens_total=stats.cached_prompt_tokens_total,
            adapters=self._adapters() if self._adapters is not None else stats.adapters,
        )


def _logprob_message(logprob: TokenLogprob) -> runtime_pb2.TokenLogprob:
    return runtime_pb2.TokenLogprob(
        token=logprob.token, logprob=logprob.logprob, bytes=logprob.data,
        top_logprobs=[runtime_pb2.TopLogprob(token=t.token, logprob=t.logprob, bytes=t.data) for t in logprob.top],
    )


def registrar(servicer: RuntimeServicer) -> Callable[[grpc.aio.Server], str]:
    """For create_grpc_server: adds the servicer and names it for health and reflection."""

    def register(server: grpc.aio.Server) -> str:
        runtime_pb2_grpc.add_RuntimeServiceServicer_to_server(servicer, server)
        return runtime_pb2.DESCRIPTOR.services_by_name["RuntimeService"].full_name

    return register


class AdapterServicer(adapters_pb2_grpc.AdapterServiceServicer):
    """LoadAdapter / UnloadAdapter / ListAdapters over the replica's LiveAdapters."""

    def __init__(self, adapters: LiveAdapters) -> None:
        self._adapters = adapters

    async def LoadAdapter(
        self, request: adapters_pb2.LoadAdapterRequest, context: grpc.aio.ServicerContext
    ) -> adapters_pb2.LoadAdapterResponse:
        info, loaded = await self._adapters.load(request)
        return adapters_pb2.LoadAdapterResponse(adapter=info, loaded=loaded)

    async def UnloadAdapter(
        self, request: adapters_pb2.UnloadAdapterRequest, context: grpc.aio.ServicerContext
    ) -> adapters_pb2.UnloadAdapterResponse:
        await self._adapters.unload(request.name)
        return adapters_pb2.UnloadAdapterResponse()

    async def ListAdapters(
        self, request: adapters_pb2.ListAdaptersRequest, context: grpc.aio.ServicerContext
    ) -> adapters_pb2.ListAdaptersResponse:
        return adapters_pb2.ListAdaptersResponse(adapters=self._adapters.listed())


def adapter_registrar(servicer: AdapterServicer) -> Callable[[grpc.aio.Server], str]:
    def register(server: grpc.aio.Server) -> str:
        adapters_pb2_grpc.add_AdapterServiceServicer_to_server(servicer, server)
        return adapters_pb2.DESCRIPTOR.services_by_name["AdapterService"].full_name

    return register
