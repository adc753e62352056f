"""GET /api/v1/runtime-stats: each ready replica's GetStats (running and waiting requests, KV cache use, token
counters), read live from the runtimes this balancer routes to.

The console needs these per replica and no public API had them: runtimes speak gRPC on internal addresses, and
the balancer's /metrics carries only what it saw itself. Admin token required, like the rest of /api/v1.
Counters are totals since each runtime started; a client takes rates from two readings. Served by the gateway
(see gateway/api.py) beside the bridged RPCs, and listed in /api/v1/openapi.json.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import grpc
from aiohttp import web

from clowder.runtime.v1 import runtime_pb2
from clowder_common.errors import ClowderError
from clowder_common.rest import error_response, error_response_spec

from clowder_balancer.apikeys import check_admin
from clowder_balancer.channels import ChannelPool
from clowder_balancer.discovery import Discovery

# One slow runtime must not hold the page up: it is reported unreachable instead.
STATS_TIMEOUT_S = 1.0


class RuntimeStatsApi:
    """GET <prefix>/runtime-stats, a RestRoutes of the gateway."""

    def __init__(self, discovery: Discovery, channels: ChannelPool, admin_token: str | None) -> None:
        self._discovery = discovery
        self._channels = channels
        self._token = admin_token.encode() if admin_token else None

    def install(self, app: web.Application, prefix: str) -> None:
        app.router.add_get(f"{prefix}/runtime-stats", self.handle)

    def openapi_paths(self, prefix: str) -> dict[str, dict[str, Any]]:
        integer, counter = {"type": "integer"}, {"type": "integer", "description": "total since the runtime started"}
        replica = {"type": "object", "required": ["deployment", "replica", "endpoint", "reachable"], "properties": {
            "deployment": {"type": "string"}, "replica": {"type": "string"}, "endpoint": {"type": "string"},
            "reachable": {"type": "boolean"},
            "error": {"type": "string", "description": "the gRPC code of a replica that did not answer in time"},
            "running": integer, "waiting": integer,
            "kvCacheUsage": {"type": "number", "minimum": 0, "maximum": 1, "description": "a fraction"},
            "slots": integer, "requestsTotal": counter, "generationTokensTotal": counter,
            "promptTokensTotal": counter,
        }}
        return {f"{prefix}/runtime-stats": {"get": {
            "operationId": "Balancer_GetRuntimeStats",
            "tags": ["Balancer"],
            "summary": "Each ready replica's runtime figures (GetStats), read live by this balancer; admin token",
            "parameters": [{"name": "deployment", "in": "query", "required": False, "schema": {"type": "string"},
                            "description": "only this deployment's replicas"}],
            "responses": {"200": {"description": "One entry per ready replica", "content": {"application/json": {
                "schema": {"type": "object", "properties": {
                    "time": {"type": "number", "description": "when it was read, seconds since the epoch"},
                    "replicas": {"type": "array", "items": replica}}}}}},
                "default": error_response_spec()},
        }}}

    async def handle(self, request: web.Request) -> web.Response:
        try:
            # ApiKeyService's check, so the console treats every /api/v1 refusal alike.
            check_admin(self._token, request.headers.get("Authorization"))
            wanted = request.query.get("deployment", "")
            targets = [(model.name, endpoint) for model in self._discovery.models()
                       if not wanted or model.name == wanted
                       for endpoint in self._discovery.registered_endpoints(model.name)]
        except ClowderError as err:
            return error_response(err)
        replicas = await asyncio.gather(*(self._one(name, endpoint.replica_id, endpoint.address)
                                          for name, endpoint in targets))
        return web.json_response({"time": time.time(), "replicas": list(replicas)})

    async def _one(self, deployment: str, replica_id: str, address: str) -> dict[str, Any]:
        out = {"deployment": deployment, "replica": replica_id, "endpoint": address}
        try:
            async with self._channels.stub(address) as stub:
                reply = await stub.GetStats(runtime_pb2.GetStatsRequest(), timeout=STATS_TIMEOUT_S)
        except grpc.aio.AioRpcError as err:
            return {**out, "reachable": False, "error": err.code().name}
        return {
            **out,
            "reachable": True,
            "running": reply.num_requests_running,
            "waiting": reply.num_requests_waiting,
            # The runtime reports a fraction (0..1) despite the protocol's "perc" name.
            "kvCacheUsage": reply.kv_cache_usage_perc,
            "slots": reply.slots,
            "requestsTotal": reply.requests_total,
            "generationTokensTotal": reply.generation_tokens_total,
            "promptTokensTotal": reply.prompt_tokens_total,
        }
