"""The original Clowder's REST routes (`POST /api/v1/workers`, `GET /api/v1/workers/list`) on top of the
controller's ImageService, DeploymentService and NodeService, through the gateway's channels."""

from __future__ import annotations

import json
from typing import Any

import grpc
from aiohttp import web

from clowder.controller.v1 import controller_pb2, controller_pb2_grpc, resources_pb2
from clowder_common.errors import AlreadyExists, ClowderError, FieldViolation, InvalidArgument
from clowder_common.rest import RestBridge, call_metadata, error_response, error_response_spec, rpc_error_response
from clowder_common.rest.transcode import message_json

_SERVICES = {name: controller_pb2.DESCRIPTOR.services_by_name[name].full_name
             for name in ("ImageService", "DeploymentService", "NodeService")}
_LIST_PAGE = 1000
_WORKER_FIELDS = ("modelUrl", "modelAlias", "nodeName", "credentials")


class Workers:
    """A "worker" of the original API is one replica of a one-replica deployment named after its model.

    Served when the bridge reaches the controller (see `supported`); calls go over the bridge's channels,
    with the caller's Authorization header, under its unary deadline.
    """

    def __init__(self, bridge: RestBridge) -> None:
        self._bridge = bridge

    @staticmethod
    def supported(bridge: RestBridge) -> bool:
        return all(name in bridge.targets for name in _SERVICES.values())

    def install(self, app: web.Application, prefix: str) -> None:
        app.router.add_post(f"{prefix}/workers", self._create)
        app.router.add_get(f"{prefix}/workers/list", self._list)

    def _channel(self, service: str) -> grpc.aio.Channel:
        return self._bridge.channels.get(self._bridge.targets[_SERVICES[service]])

    def _stubs(self) -> tuple[controller_pb2_grpc.ImageServiceStub, controller_pb2_grpc.DeploymentServiceStub,
                              controller_pb2_grpc.NodeServiceStub]:
        return (controller_pb2_grpc.ImageServiceStub(self._channel("ImageService")),
                controller_pb2_grpc.DeploymentServiceStub(self._channel("DeploymentService")),
                controller_pb2_grpc.NodeServiceStub(self._channel("NodeService")))

    async def _create(self, request: web.Request) -> web.Response:
        try:
            fields = _worker_fields(await request.read())
            images, deployments, nodes = self._stubs()
            meta, timeout = call_metadata(request), self._bridge.options.unary_timeout_s
            if fields["nodeName"]:
                await nodes.GetNode(controller_pb2.GetNodeRequest(name=fields["nodeName"]),
                                    metadata=meta, timeout=timeout)
            alias, url = fields["modelAlias"], fields["modelUrl"]
            try:
                image = (await images.GetImage(controller_pb2.GetImageRequest(alias=alias),
                                               metadata=meta, timeout=timeout)).image
                if image.source_url != url:
                    raise AlreadyExists(f"model alias {alias!r} already names {image.source_url}",
                                        field="modelAlias")
            except grpc.RpcError as err:
                if err.code() != grpc.StatusCode.NOT_FOUND:
                    raise
                image = (await images.CreateImage(controller_pb2.CreateImageRequest(
                    image=resources_pb2.Image(alias=alias, source_url=url)), metadata=meta, timeout=timeout)).image
            deployment = (await deployments.CreateDeployment(controller_pb2.CreateDeploymentRequest(
                deployment=resources_pb2.Deployment(name=alias, image=alias, replicas=1)),
                metadata=meta, timeout=timeout)).deployment
        except ClowderError as err:
            return error_response(err)
        except grpc.RpcError as err:
            return rpc_error_response(err)
        return web.json_response({"image": message_json(image), "deployment": message_json(deployment)})

    async def _list(self, request: web.Request) -> web.Response:
        images, deployments, _ = self._stubs()
        meta, timeout = call_metadata(request), self._bridge.options.unary_timeout_s
        try:
            by_name: dict[str, resources_pb2.Deployment] = {}
            token = ""
            while True:
                page = await deployments.ListDeployments(controller_pb2.ListDeploymentsRequest(
                    page_size=_LIST_PAGE, page_token=token), metadata=meta, timeout=timeout)
                by_name.update((d.name, d) for d in page.deployments)
                token = page.next_page_token
                if not token:
                    break
            sources: dict[str, str] = {}
            token = ""
            while True:
                page_images = await images.ListImages(controller_pb2.ListImagesRequest(
                    page_size=_LIST_PAGE, page_token=token), metadata=meta, timeout=timeout)
                sources.update((i.alias, i.source_url) for i in page_images.images)
                token = page_images.next_page_token
                if not token:
                    break
            replicas = (await deployments.ListReplicas(controller_pb2.ListReplicasRequest(deployment="-"),
                                                       metadata=meta, timeout=timeout)).replicas
        except grpc.RpcError as err:
            return rpc_error_response(err)
        workers = []
        for replica in sorted(replicas, key=lambda r: (r.deployment, r.id)):
            deployment = by_name.get(replica.deployment)
            alias = deployment.image if deployment is not None else ""
            workers.append({
                "id": replica.id,
                "deployment": replica.deployment,
                "modelAlias": alias,
                "modelUrl": sources.get(alias, ""),
                "nodeName": replica.node,
                "state": resources_pb2.ReplicaState.Name(replica.state),
                "endpoint": replica.endpoint,
                "message": replica.message,
            })
        return web.json_response({"workers": workers})

    def openapi_paths(self, prefix: str) -> dict[str, dict[str, Any]]:
        error = error_response_spec()
        string = {"type": "string"}
        worker = {"type": "object", "properties": {name: string for name in (
            "id", "deployment", "modelAlias", "modelUrl", "nodeName", "state", "endpoint", "message")}}
        return {
            f"{prefix}/workers": {"post": {
                "operationId": "Compat_CreateWorker",
                "tags": ["Compatibility"],
                "summary": "Original Clowder API: add a model and run one replica of it",
                "requestBody": {"required": True, "content": {"application/json": {"schema": {
                    "type": "object", "required": ["modelUrl", "modelAlias"],
                    "properties": {
                        "modelUrl": string, "modelAlias": string,
                        "nodeName": {"type": "string", "description": "must name a registered node"},
                        "credentials": {"type": "string", "description": "not supported: must be empty"},
                    }}}}},
                "responses": {"200": {"description": "The aimage and its deployment", "content": {
                    "application/json": {"schema": {"type": "object", "properties": {
                        "image": {"$ref": "#/components/schemas/clowder.controller.v1.Image"},
                        "deployment": {"$ref": "#/components/schemas/clowder.controller.v1.Deployment"},
                    }}}}}, "default": error},
            }},
            f"{prefix}/workers/list": {"get": {
                "operationId": "Compat_ListWorkers",
                "tags": ["Compatibility"],
                "summary": "Original Clowder API: every replica with its model and node",
                "responses": {"200": {"description": "The workers", "content": {"application/json": {"schema": {
                    "type": "object", "properties": {"workers": {"type": "array", "items": worker}}}}}},
                    "default": error},
            }},
        }


def _worker_fields(body: bytes) -> dict[str, str]:
    try:
        data = json.loads(body or b"{}")
    except (ValueError, UnicodeDecodeError) as err:
        raise InvalidArgument(f"the request body is not valid JSON: {err}", field="body") from None
    if not isinstance(data, dict):
        raise InvalidArgument("the request body must be a JSON object", field="body")
    violations = [FieldViolation(k, "unknown field") for k in data if k not in _WORKER_FIELDS]
    violations += [FieldViolation(k, "must be a string") for k in _WORKER_FIELDS
                   if k in data and not isinstance(data[k], str)]
    fields = {k: value if isinstance(value := data.get(k), str) else "" for k in _WORKER_FIELDS}
    violations += [FieldViolation(k, "is required") for k in ("modelUrl", "modelAlias")
                   if k in data and isinstance(data[k], str) and not data[k] or k not in data]
    if fields["credentials"]:
        # Images carry no per-source secrets yet; storage nodes hold source credentials themselves.
        violations.append(FieldViolation("credentials", "per-model credentials are not supported; configure "
                                                         "source credentials on the storage nodes"))
    if violations:
        raise InvalidArgument("; ".join(f"{v.field}: {v.description}" for v in violations), violations=violations)
    return fields
