"""The REST bridge: aiohttp handlers that transcode HTTP/JSON to the annotated gRPC calls and back."""

from __future__ import annotations

import asyncio
import json
import logging
import urllib.parse
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

import grpc
from aiohttp import web
from google.protobuf import descriptor
from google.rpc import error_details_pb2, status_pb2

from clowder_common.clients import aio_channel
from clowder_common.security import NO_SECURITY, ClusterSecurity
from clowder_common.errors import HTTP_STATUS, ClowderError
from clowder_common.rest import transcode
from clowder_common.rest.routes import Route, resolve_services, routes_of

log = logging.getLogger(__name__)

NDJSON = "application/x-ndjson"
# Request headers passed on as gRPC metadata.
FORWARDED_HEADERS = ("authorization", "x-request-id")
_CODE_BY_NUMBER = {code.value[0]: code for code in grpc.StatusCode}
BRIDGE_KEY = web.AppKey("clowder_rest_bridge", object)


@dataclass(frozen=True)
class BridgeOptions:
    # Deadline of one unary call.
    unary_timeout_s: float = 30.0
    # Deadline of one server-streaming call (a pull of a large model takes a while).
    stream_timeout_s: float = 6 * 3600.0
    # TLS towards the bridged services, when they serve it.
    security: ClusterSecurity = NO_SECURITY


def grpc_code(number: int) -> grpc.StatusCode:
    return _CODE_BY_NUMBER.get(number, grpc.StatusCode.UNKNOWN)


def status_response(status: status_pb2.Status, headers: Mapping[str, str] | None = None) -> web.Response:
    """A google.rpc.Status as JSON, with the HTTP status grpc-gateway gives its code."""
    http = HTTP_STATUS.get(grpc_code(status.code), 500)
    response = web.json_response(transcode.status_json(status), status=http, headers=headers)
    retry = _retry_after(status)
    if retry is not None and http in (429, 503):
        response.headers["Retry-After"] = str(max(1, round(retry)))
    return response


def error_response(error: ClowderError) -> web.Response:
    return status_response(error.to_status())


def plain_status(code: grpc.StatusCode, message: str) -> status_pb2.Status:
    return status_pb2.Status(code=code.value[0], message=message)


def _retry_after(status: status_pb2.Status) -> float | None:
    for detail in status.details:
        if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            info = error_details_pb2.RetryInfo()
            detail.Unpack(info)
            return info.retry_delay.ToNanoseconds() / 1e9
    return None


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
                 services: Sequence[descriptor.ServiceDescriptor], options: BridgeOptions) -> None:
        self.prefix = prefix.rstrip("/")
        self.targets = dict(targets)
        self.services = list(services)
        self.options = options
        self.routes = routes_of(self.services)
        self.channels = Channels(options.security)
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
        if found == 404:
            return status_response(plain_status(grpc.StatusCode.NOT_FOUND, f"no API route for {request.path}"))
        if found == 405:
            # grpc-gateway answers UNIMPLEMENTED with HTTP 405 when only the method is wrong.
            status = plain_status(grpc.StatusCode.UNIMPLEMENTED,
                                  f"method {request.method} is not allowed on {request.path}")
            return web.json_response(transcode.status_json(status), status=405)
        route, values = found  # type: ignore[misc]
        try:
            message = transcode.build_request(route, values, _query_pairs(request), await request.read())
        except ClowderError as err:
            return error_response(err)
        if route.streaming:
            return await self._stream(request, route, message)
        return await self._unary(request, route, message)

    async def _unary(self, request: web.Request, route: Route, message) -> web.Response:
        call = self.channels.get(self.address_of(route)).unary_unary(
            route.grpc_path, request_serializer=type(message).SerializeToString,
            response_deserializer=route.response_class().FromString)
        try:
            reply = await call(message, metadata=call_metadata(request), timeout=self.options.unary_timeout_s)
        except grpc.RpcError as err:
            return status_response(transcode.status_of_rpc_error(err))
        return web.json_response(transcode.response_json(route, reply))

    async def _stream(self, request: web.Request, route: Route, message) -> web.StreamResponse:
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
                return status_response(transcode.status_of_rpc_error(err))
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


def install_rest_bridge(app: web.Application, prefix: str = "/api/v1", *, targets: Mapping[str, str],
                        services: Iterable[descriptor.ServiceDescriptor] | None = None,
                        options: BridgeOptions | None = None, compat: bool = True,
                        title: str = "Clowder control plane") -> RestBridge:
    """Serve the annotated RPCs of `targets` ({service full name: gRPC address}) under `prefix`.

    Also `<prefix>/openapi.json` (generated from the same descriptors) and, with `compat`, the
    original Clowder's `/workers` routes. The caller's Authorization header goes along with each call.
    """
    from clowder_common.rest import compat as compat_routes
    from clowder_common.rest.openapi import openapi_document

    resolved = list(services) if services is not None else resolve_services(targets)
    missing = [s.full_name for s in resolved if s.full_name not in targets]
    if missing:
        raise ValueError(f"no gRPC address for {', '.join(missing)}")
    bridge = RestBridge(prefix, targets, resolved, options or BridgeOptions())
    app[BRIDGE_KEY] = bridge
    workers = compat_routes.Workers(bridge) if compat and compat_routes.Workers.supported(bridge) else None
    document = openapi_document(bridge.routes, title=title, extra_paths=workers.openapi_paths() if workers else {})
    body = json.dumps(document, indent=1).encode()

    async def openapi(request: web.Request) -> web.Response:
        return web.Response(body=body, content_type="application/json")

    app.router.add_get(f"{bridge.prefix}/openapi.json", openapi)
    if workers is not None:
        workers.install(app)
    app.router.add_route("*", f"{bridge.prefix}/{{tail:.*}}", bridge.handle)

    async def close(_app: web.Application) -> None:
        await bridge.channels.close()

    app.on_cleanup.append(close)
    return bridge

