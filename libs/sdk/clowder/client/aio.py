"""The asyncio client (grpc.aio): the same calls as the synchronous one, awaited."""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import time
from collections.abc import AsyncGenerator
from typing import Any, AsyncIterator, Callable, Iterable

import grpc
import tenacity

from clowder.balancer.v1 import apikeys_pb2, apikeys_pb2_grpc, inference_pb2, inference_pb2_grpc
from clowder.controller.v1 import controller_pb2, controller_pb2_grpc, resources_pb2
from clowder_common.auth import bearer_metadata
from clowder_common.clients import aio_channel
from clowder_common.errors import ClowderError, DeadlineExceeded, Unavailable, from_rpc_error

from clowder.balancer.v1 import batch_pb2_grpc
from clowder.client.adapters import AsyncAdapters
from clowder.client.batches import AsyncBatches
from clowder.controller.v1 import adapters_pb2_grpc
from clowder.client import _settings
from clowder.client._shared import (Chunk, Collector, Completion, Embeddings, Message, Tool, ToolChoiceSpec,
                                    api_key_request, chat_request, chunk_of, completion_request, deployment,
                                    embedding_request, embeddings_of, image, retrying_kwargs,
                                    update_request)

PULL_TIMEOUT_S = 6 * 3600.0


class _Caller:
    def __init__(self, metadata: tuple[tuple[str, str], ...], timeout_s: float, max_attempts: int) -> None:
        self.metadata = metadata
        self.timeout_s = timeout_s
        self.max_attempts = max_attempts

    async def unary(self, method: Callable[..., Any], request: Any, *, idempotent: bool,
                    timeout_s: float | None = None) -> Any:
        budget = timeout_s or self.timeout_s
        deadline = time.monotonic() + budget
        failures: list[ClowderError] = []

        async def attempt() -> Any:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                # Out of time between retries: the failure that made us retry says more than a bare deadline.
                raise failures[-1] if failures else DeadlineExceeded(f"no time left of the {budget:g}s deadline")
            try:
                return await method(request, metadata=self.metadata, timeout=remaining)
            except grpc.RpcError as err:
                failures.append(from_rpc_error(err))
                raise failures[-1] from None

        if not idempotent:
            return await attempt()
        return await tenacity.AsyncRetrying(**retrying_kwargs(deadline, self.max_attempts))(attempt)

    async def stream(self, method: Callable[..., Any], request: Any, timeout_s: float) -> AsyncGenerator[Any, None]:
        call = method(request, metadata=self.metadata, timeout=timeout_s)
        try:
            async for reply in call:
                yield reply
        except grpc.RpcError as err:
            raise from_rpc_error(err) from None
        finally:
            call.cancel()


class Images:
    def __init__(self, caller: _Caller, stub: controller_pb2_grpc.ImageServiceStub) -> None:
        self._call, self._stub = caller, stub

    async def create(self, alias: str, source_url: str, configuration: Any = None, *, credentials_ref: str = "",
               credentials_username: str = "") -> resources_pb2.Image:
        """`credentials_ref` is where the storage node reads the source's secret (env:NAME or file:/path)."""
        request = controller_pb2.CreateImageRequest(
            image=image(alias, source_url, configuration, credentials_ref, credentials_username))
        return (await self._call.unary(self._stub.CreateImage, request, idempotent=False)).image

    async def get(self, alias: str) -> resources_pb2.Image:
        return (await self._call.unary(self._stub.GetImage, controller_pb2.GetImageRequest(alias=alias),
                                       idempotent=True)).image

    async def list_page(self, page_size: int = 0, page_token: str = "") -> controller_pb2.ListImagesResponse:
        return await self._call.unary(self._stub.ListImages, controller_pb2.ListImagesRequest(
            page_size=page_size, page_token=page_token), idempotent=True)

    async def list(self, page_size: int = 100) -> AsyncIterator[resources_pb2.Image]:
        token = ""
        while True:
            page = await self.list_page(page_size, token)
            for item in page.images:
                yield item
            token = page.next_page_token
            if not token:
                return

    async def delete(self, alias: str) -> None:
        await self._call.unary(self._stub.DeleteImage, controller_pb2.DeleteImageRequest(alias=alias),
                               idempotent=False)

    def pull(self, alias: str, node: str = "", timeout_s: float = PULL_TIMEOUT_S
             ) -> AsyncIterator[controller_pb2.PullImageResponse]:
        return self._call.stream(self._stub.PullImage, controller_pb2.PullImageRequest(alias=alias, node=node),
                                 timeout_s)


class Deployments:
    def __init__(self, caller: _Caller, stub: controller_pb2_grpc.DeploymentServiceStub) -> None:
        self._call, self._stub = caller, stub

    async def create(self, name: str, image: str | None = None, replicas: int = 1, *, slots: int | None = None,
               threads: int | None = None, context_size: int | None = None, batch_size: int | None = None
               ) -> resources_pb2.Deployment:
        """`image` defaults to `name`. slots, threads, context_size and batch_size override the aimage's (None:
        the aimage's, else the cluster's defaults)."""
        settings = dict(slots=slots, threads=threads, context_size=context_size, batch_size=batch_size)
        request = controller_pb2.CreateDeploymentRequest(deployment=deployment(name, image, replicas, settings))
        return (await self._call.unary(self._stub.CreateDeployment, request, idempotent=False)).deployment

    async def get(self, name: str) -> resources_pb2.Deployment:
        return (await self._call.unary(self._stub.GetDeployment, controller_pb2.GetDeploymentRequest(name=name),
                                       idempotent=True)).deployment

    async def list_page(self, page_size: int = 0, page_token: str = "") -> controller_pb2.ListDeploymentsResponse:
        return await self._call.unary(self._stub.ListDeployments, controller_pb2.ListDeploymentsRequest(
            page_size=page_size, page_token=page_token), idempotent=True)

    async def list(self, page_size: int = 100) -> AsyncIterator[resources_pb2.Deployment]:
        token = ""
        while True:
            page = await self.list_page(page_size, token)
            for item in page.deployments:
                yield item
            token = page.next_page_token
            if not token:
                return

    async def scale(self, name: str, replicas: int, image: str | None = None) -> resources_pb2.Deployment:
        request = controller_pb2.UpdateDeploymentRequest(
            deployment=resources_pb2.Deployment(name=name, image=image or "", replicas=replicas))
        return (await self._call.unary(self._stub.UpdateDeployment, request, idempotent=False)).deployment

    async def update(self, name: str, *, replicas: int | None = None, image: str | None = None,
               slots: int | None = None, threads: int | None = None, context_size: int | None = None,
               batch_size: int | None = None, clear: Iterable[str] = ()) -> resources_pb2.Deployment:
        """Change only the fields given (a new image or runtime setting rolls the replicas over); `clear` names
        runtime settings to unset (the aimage's apply again)."""
        request = update_request(name, replicas, image, dict(slots=slots, threads=threads,
                                                              context_size=context_size, batch_size=batch_size),
                                 clear)
        return (await self._call.unary(self._stub.UpdateDeployment, request, idempotent=False)).deployment

    async def delete(self, name: str) -> None:
        await self._call.unary(self._stub.DeleteDeployment, controller_pb2.DeleteDeploymentRequest(name=name),
                               idempotent=False)

    async def replicas(self, name: str = "-") -> builtins.list[resources_pb2.Replica]:  # `list` here: the method
        reply = await self._call.unary(self._stub.ListReplicas, controller_pb2.ListReplicasRequest(deployment=name),
                                       idempotent=True)
        return list(reply.replicas)

    async def wait_ready(self, name: str, timeout_s: float = 300.0, poll_s: float = 0.25) -> resources_pb2.Deployment:
        deadline = time.monotonic() + timeout_s
        while True:
            current = await self.get(name)
            if current.ready_replicas >= current.replicas:
                return current
            if time.monotonic() > deadline:
                raise Unavailable(f"deployment {name!r} has {current.ready_replicas}/{current.replicas} ready "
                                  f"replicas after {timeout_s:g}s", reason="NOT_READY")
            await asyncio.sleep(poll_s)


class Services:
    """Services: revisions of one model name, their traffic split and rollouts (ServingService)."""

    def __init__(self, caller: _Caller, stub: controller_pb2_grpc.ServingServiceStub) -> None:
        self._call, self._stub = caller, stub

    async def apply(self, template: resources_pb2.Deployment, rollout: resources_pb2.RolloutPolicy | None = None,
                    *, weight: int | None = None, spec: str = "") -> controller_pb2.ApplyServiceResponse:
        """Create the service, or make a new revision of a changed template and start moving traffic to it."""
        request = controller_pb2.ApplyServiceRequest(template=template, rollout=rollout, weight=weight, spec=spec)
        return await self._call.unary(self._stub.ApplyService, request, idempotent=False)

    async def get(self, name: str) -> resources_pb2.Service:
        """With each live revision's request rate, error rate and p95 time to first token (metrics)."""
        return (await self._call.unary(self._stub.GetService, controller_pb2.GetServiceRequest(name=name),
                                       idempotent=True)).service

    async def list(self) -> list[resources_pb2.Service]:
        reply = await self._call.unary(self._stub.ListServices, controller_pb2.ListServicesRequest(), idempotent=True)
        return list(reply.services)

    async def promote(self, name: str) -> resources_pb2.Service:
        return (await self._call.unary(self._stub.PromoteService, controller_pb2.PromoteServiceRequest(name=name),
                                       idempotent=False)).service

    async def rollback(self, name: str, revision: int = 0) -> resources_pb2.Service:
        request = controller_pb2.RollbackServiceRequest(name=name, revision=revision)
        return (await self._call.unary(self._stub.RollbackService, request, idempotent=False)).service

    async def set_traffic(self, name: str, percents: dict[int, int]) -> resources_pb2.Service:
        """`percents`: revision number -> percent of the traffic (adding up to 100)."""
        request = controller_pb2.SetServiceTrafficRequest(name=name, traffic=[
            resources_pb2.TrafficTarget(revision=r, percent=p) for r, p in percents.items()])
        return (await self._call.unary(self._stub.SetServiceTraffic, request, idempotent=False)).service

    async def delete(self, name: str) -> None:
        await self._call.unary(self._stub.DeleteService, controller_pb2.DeleteServiceRequest(name=name),
                               idempotent=False)


class Nodes:
    def __init__(self, caller: _Caller, stub: controller_pb2_grpc.NodeServiceStub) -> None:
        self._call, self._stub = caller, stub

    async def list(self) -> list[resources_pb2.Node]:
        reply = await self._call.unary(self._stub.ListNodes, controller_pb2.ListNodesRequest(), idempotent=True)
        return list(reply.nodes)

    async def get(self, name: str) -> resources_pb2.Node:
        return (await self._call.unary(self._stub.GetNode, controller_pb2.GetNodeRequest(name=name),
                                       idempotent=True)).node


class ApiKeys:
    """User API keys for the OpenAI API (kept by the balancers; needs the admin token)."""

    def __init__(self, caller: _Caller, stub: apikeys_pb2_grpc.ApiKeyServiceStub) -> None:
        self._call, self._stub = caller, stub

    async def create(self, description: str = "", groups: Iterable[str] = ()) -> tuple[apikeys_pb2.ApiKey, str]:
        """The new key's record and its secret, which is shown only this once."""
        reply = await self._call.unary(self._stub.CreateApiKey, api_key_request(description, groups),
                                       idempotent=False)
        return reply.api_key, reply.key

    async def get(self, key_id: str) -> apikeys_pb2.ApiKey:
        return (await self._call.unary(self._stub.GetApiKey, apikeys_pb2.GetApiKeyRequest(id=key_id),
                                       idempotent=True)).api_key

    async def list(self, page_size: int = 100) -> AsyncIterator[apikeys_pb2.ApiKey]:
        token = ""
        while True:
            page = await self._call.unary(self._stub.ListApiKeys, apikeys_pb2.ListApiKeysRequest(
                page_size=page_size, page_token=token), idempotent=True)
            for key in page.api_keys:
                yield key
            token = page.next_page_token
            if not token:
                return

    async def revoke(self, key_id: str) -> None:
        await self._call.unary(self._stub.DeleteApiKey, apikeys_pb2.DeleteApiKeyRequest(id=key_id),
                               idempotent=False)


class AsyncClient:
    """asyncio Clowder client; settings resolve as for `Client`. Use `async with` or `await close()`."""

    def __init__(self, controller: str | None = None, balancer: str | None = None, *,
                 admin_token: str | None = None, api_key: str | None = None, timeout_s: float = 30.0,
                 max_attempts: int = 4, tls_ca_file: str | None = None, tls_cert_file: str | None = None,
                 tls_key_file: str | None = None) -> None:
        self.settings = _settings.resolve(controller, balancer, admin_token, api_key, timeout_s, max_attempts,
                                          tls_ca_file=tls_ca_file, tls_cert_file=tls_cert_file,
                                          tls_key_file=tls_key_file)
        s = self.settings
        self._control_channel = aio_channel(s.controller, s.security)
        self._inference_channel = aio_channel(s.balancer, s.security)
        control = _Caller(bearer_metadata(s.admin_token), s.timeout_s, s.max_attempts)
        self._inference = _Caller(bearer_metadata(s.api_key), s.timeout_s, s.max_attempts)
        self._stub = inference_pb2_grpc.InferenceServiceStub(self._inference_channel)
        self.images = Images(control, controller_pb2_grpc.ImageServiceStub(self._control_channel))
        self.deployments = Deployments(control, controller_pb2_grpc.DeploymentServiceStub(self._control_channel))
        self.nodes = Nodes(control, controller_pb2_grpc.NodeServiceStub(self._control_channel))
        self.services = Services(control, controller_pb2_grpc.ServingServiceStub(self._control_channel))
        self.adapters = AsyncAdapters(control, adapters_pb2_grpc.AdapterServiceStub(self._control_channel))
        # API keys live with the balancers, behind the admin token.
        self.api_keys = ApiKeys(control, apikeys_pb2_grpc.ApiKeyServiceStub(self._inference_channel))
        # Batch jobs (files and batches) run under the client's API key.
        self.batches = AsyncBatches(self._inference, batch_pb2_grpc.BatchServiceStub(self._inference_channel))

    async def models(self) -> list[inference_pb2.Model]:
        reply = await self._inference.unary(self._stub.ListModels, inference_pb2.ListModelsRequest(),
                                            idempotent=True)
        return list(reply.models)

    def chat_stream(self, model: str, messages: Iterable[Message], *, n: int | None = None,
                    tools: Iterable[Tool] | None = None, tool_choice: ToolChoiceSpec | None = None,
                    timeout_s: float | None = None, **sampling: Any) -> AsyncGenerator[Chunk, None]:
        """Leaving the `async for` early (or `aclose()`) cancels the generation."""
        request = chat_request(model, messages, sampling, n, tools, tool_choice)
        return self._chunks(self._stub.CreateChatCompletion, request, timeout_s)

    async def chat(self, model: str, messages: Iterable[Message], *, n: int | None = None,
                   tools: Iterable[Tool] | None = None, tool_choice: ToolChoiceSpec | None = None,
                   timeout_s: float | None = None, **sampling: Any) -> Completion:
        """`n` choices (Completion.choices); `tools` as OpenAI defines them; `logprobs=True, top_logprobs=k`
        fill Completion.logprobs."""
        return await _collect(self.chat_stream(model, messages, n=n, tools=tools, tool_choice=tool_choice,
                                               timeout_s=timeout_s, **sampling))

    def complete_stream(self, model: str, prompt: str, *, n: int | None = None, timeout_s: float | None = None,
                        **sampling: Any) -> AsyncGenerator[Chunk, None]:
        request = completion_request(model, prompt, sampling, n)
        return self._chunks(self._stub.CreateCompletion, request, timeout_s)

    async def complete(self, model: str, prompt: str, *, n: int | None = None, timeout_s: float | None = None,
                       **sampling: Any) -> Completion:
        return await _collect(self.complete_stream(model, prompt, n=n, timeout_s=timeout_s, **sampling))

    async def embed(self, model: str, inputs: str | Iterable[str], *, timeout_s: float | None = None) -> Embeddings:
        """One L2-normalized vector per input text."""
        reply = await self._inference.unary(self._stub.CreateEmbedding, embedding_request(model, inputs),
                                            idempotent=True, timeout_s=timeout_s)
        return embeddings_of(reply)

    async def _chunks(self, method: Callable[..., Any], request: Any, timeout_s: float | None
                      ) -> AsyncGenerator[Chunk, None]:
        replies = self._inference.stream(method, request, timeout_s or self.settings.timeout_s)
        async with contextlib.aclosing(replies):
            async for reply in replies:
                yield chunk_of(reply)

    async def close(self) -> None:
        await self._control_channel.close()
        await self._inference_channel.close()

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()


async def _collect(chunks: AsyncGenerator[Chunk, None]) -> Completion:
    collector = Collector()
    async with contextlib.aclosing(chunks):
        async for chunk in chunks:
            collector.add(chunk)
    return collector.result()
