"""The REST bridge: aiohttp handlers that transcode HTTP/JSON to the annotated gRPC calls and back.

Generic: it serves whatever google.api.http-annotated services it is given. Routes of a product that are not
annotated RPCs (the balancer's /api/v1/workers, /api/v1/runtime-stats) are RestRoutes that their service
passes to install_rest_bridge, which serves them beside the bridge and lists them in the same OpenAPI document.
"""

from __future__ import annotations

import asyncio
import json
import logging
import urllib.parse
from dataclasses import dataclass
from typing import Any, Mapping, Protocol, Sequence

import grpc
from aiohttp import web
from google.protobuf import descriptor
from google.protobuf.message import Message

from clowder_common.clients import aio_channel
from clowder_common.errors import ClowderError
from clowder_common.rest import transcode
from clowder_common.rest.openapi import openapi_document
from clowder_common.rest.responses import error_response, plain_status, rpc_error_response, status_response
from clowder_common.rest.routes import Route, resolve_services, routes_of
from clowder_common.security import NO_SECURITY, ClusterSecurity

log = logging.getLogger(__name__)

NDJSON = "application/x-ndjson"
# Request headers passed on as gRPC metadata.
FORWARDED_HEADERS = ("authorization", "x-request-id")
BRIDGE_KEY = web.AppKey("clowder_rest_bridge", object)


@dataclass(frozen=True)
class BridgeOptions:
    # Deadline of one unary call.
    unary_timeout_s: float = 30.0
    # Deadline of one server-streaming call (a pull of a large model takes a while).
    stream_timeout_s: float = 6 * 3600.0
    # TLS towards the bridged services, when they serve it.
    security: ClusterSecurity = NO_SECURITY


class RestRoutes(Protocol):
    """Hand-made routes under the bridge's prefix: served before its catch-all, listed in its OpenAPI document."""

    def install(self, app: web.Application, prefix: str) -> None: ...

    def openapi_paths(self, prefix: str) -> dict[str, dict[str, Any]]:
        """OpenAPI path items, their schemas inline or as refs to the bridge's component schemas."""
        ...


def call_metadata(request: web.Request) -> tuple[tuple[str, str], ...]:
    return tuple((name, request.headers[name]) for name in FORWARDED_HEADERS if name in request.headers)


class Channels:
    """One channel per gRPC address, opened on first use inside the running loop."""

    def __init__(self, security: ClusterSecurity = NO_SECURITY) -> None:
        self._security = security
        self._channels: dict[str, grpc.aio.Channel] = {}

    def get(self, address: str) -> grpc.aio.Channel:
        channel = self._channels.get(address)
        if channel is None:
            channel = self._channels[address] = aio_channel(address, self._security)
        return channel

    async def close(self) -> None:
        channels, self._channels = list(self._channels.values()), {}
        await asyncio.gather(*(c.close() for c in channels), return_exceptions=True)


class RestBridge:
    """Routes requests under `prefix` to the annotated RPCs of the target services."""

    def __init__(self, prefix: str, targets: Mapping[str, str],
                 services: Sequence[descriptor.ServiceDescriptor] | None = None,
                 options: BridgeOptions | None = None) -> None:
        """`targets`: {service full name: gRPC address}; `services`: their descriptors, by default looked up
        by name (the generated _pb2 modules must be imported)."""
        self.prefix = prefix.rstrip("/")
        self.targets = dict(targets)
        self.services = list(services) if services is not None else resolve_services(self.targets)
        missing = [s.full_name for s in self.services if s.full_name not in self.targets]
        if missing:
            raise ValueError(f"no gRPC address for {', '.join(missing)}")
        self.options = options or BridgeOptions()
        self.routes = routes_of(self.services)
        self.channels = Channels(self.options.security)
        for route in self.routes:
            if not route.template.text.startswith(self.prefix + "/"):
                raise ValueError(f"{route.method.full_name}: {route.template.text} is outside {self.prefix}/")

    def address_of(self, route: Route) -> str:
        return self.targets[route.service.full_name]

    # -- dispatch ------------------------------------------------------------------------------

    def match(self, method: str, raw_path: str) -> tuple[Route, dict[str, str]] | int:
        """The route and its path values, else 404 (no template matches) or 405 (another method does)."""
        path_matched = False
        for route in self.routes:
            values = route.template.match(raw_path)
            if values is None:
                continue
            if route.http_method == method:
                return route, values
            path_matched = True
        return 405 if path_matched else 404

    async def handle(self, request: web.Request) -> web.StreamResponse:
        raw_path = request.raw_path.split("?", 1)[0]
        found = self.match(request.method, raw_path)
        if found == 405:
            # grpc-gateway answers UNIMPLEMENTED with HTTP 405 when only the method is wrong.
            status = plain_status(grpc.StatusCode.UNIMPLEMENTED,
                                  f"method {request.method} is not allowed on {request.path}")
            return web.json_response(transcode.status_json(status), status=405)
        if isinstance(found, int):
            return status_response(plain_status(grpc.StatusCode.NOT_FOUND, f"no API route for {request.path}"))
        route, values = found
        try:
            message = transcode.build_request(route, values, _query_pairs(request), await request.read())
        except ClowderError as err:
            return error_response(err)
        if route.streaming:
            return await self._stream(request, route, message)
        return await self._unary(request, route, message)

    async def _unary(self, request: web.Request, route: Route, message: Message) -> web.Response:
        call = self.channels.get(self.address_of(route)).unary_unary(
            route.grpc_path, request_serializer=type(message).SerializeToString,
            response_deserializer=route.response_class().FromString)
        try:
            reply = await call(message, metadata=call_metadata(request), timeout=self.options.unary_timeout_s)
        except grpc.RpcError as err:
            return rpc_error_response(err)
        return web.json_response(transcode.response_json(route, reply))

    async def _stream(self, request: web.Request, route: Route, message: Message) -> web.StreamResponse:
        """Newline-delimited JSON: {"result": ...} per message, {"error": Status} if it breaks mid-way."""
        call = self.channels.get(self.address_of(route)).unary_stream(
            route.grpc_path, request_serializer=type(message).SerializeToString,
            response_deserializer=route.response_class().FromString)(
            message, metadata=call_metadata(request), timeout=self.options.stream_timeout_s)
        try:
            replies = call.__aiter__()
            # The first message decides the HTTP status: an immediate failure is a real 4xx/5xx.
            try:
                first = await anext(replies)
            except StopAsyncIteration:
                first = None
            except grpc.RpcError as err:
                return rpc_error_response(err)
            response = web.StreamResponse(status=200, headers={"Content-Type": NDJSON, "Cache-Control": "no-cache"})
            await response.prepare(request)
            if first is not None:
                await response.write(_line({"result": transcode.response_json(route, first)}))
                try:
                    async for reply in replies:
                        await response.write(_line({"result": transcode.response_json(route, reply)}))
                except grpc.RpcError as err:
                    await response.write(_line({"error": transcode.status_json(transcode.status_of_rpc_error(err))}))
            await response.write_eof()
            return response
        except ConnectionError:
            log.info("client went away during %s", route.grpc_path)
            raise
        finally:
            # A client that hung up (or any exit before the end) cancels the upstream call.
            call.cancel()


def _line(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode() + b"\n"


def _query_pairs(request: web.Request) -> list[tuple[str, str]]:
    return urllib.parse.parse_qsl(request.query_string, keep_blank_values=True)


def install_rest_bridge(app: web.Application, bridge: RestBridge, *, title: str,
                        extra: Sequence[RestRoutes] = ()) -> RestBridge:
    """Serve `bridge` on `app`: `<prefix>/openapi.json` (generated from the same descriptors, plus the paths
    of `extra`), the `extra` routes, then every annotated RPC under the prefix. The caller's Authorization
    header goes along with each call."""
    paths: dict[str, dict[str, Any]] = {}
    for routes in extra:
        paths.update(routes.openapi_paths(bridge.prefix))
    document = openapi_document(bridge.routes, title=title, extra_paths=paths)
    body = json.dumps(document, indent=1).encode()

    async def openapi(request: web.Request) -> web.Response:
        return web.Response(body=body, content_type="application/json")

    app[BRIDGE_KEY] = bridge
    app.router.add_get(f"{bridge.prefix}/openapi.json", openapi)
    for routes in extra:
        routes.install(app, bridge.prefix)
    # Last: aiohttp tries routes in the order they were added, and this one takes every path under the prefix.
    app.router.add_route("*", f"{bridge.prefix}/{{tail:.*}}", bridge.handle)

    async def close(_app: web.Application) -> None:
        await bridge.channels.close()

    app.on_cleanup.append(close)
    return bridge
