"""GET /api/v1/runtime-stats: each ready replica's GetStats (running and waiting requests, KV cache use, token
counters), read live from the runtimes this balancer routes to.

The console needs these per replica and no public API had them: runtimes speak gRPC on internal addresses, and
the balancer's /metrics carries only what it saw itself. Admin token required, like the rest of /api/v1.
Counters are totals since each runtime started; a client takes rates from two readings.
"""

from __future__ import annotations

import asyncio
import hmac
import time

import grpc
from aiohttp import web

from clowder.runtime.v1 import runtime_pb2
from clowder_common.errors import ClowderError, FailedPrecondition, Unauthenticated
from clowder_common.rest.bridge import error_response

from clowder_balancer.apikeys import bearer
from clowder_balancer.channels import ChannelPool
from clowder_balancer.discovery import Discovery

# One slow runtime must not hold the page up: it is reported unreachable instead.
STATS_TIMEOUT_S = 1.0


class RuntimeStatsApi:
    def __init__(self, discovery: Discovery, channels: ChannelPool, admin_token: str | None) -> None:
        self._discovery = discovery
        self._channels = channels
        self._token = admin_token.encode() if admin_token else None

    def _check_admin(self, request: web.Request) -> None:
        # The same answers as ApiKeyService's check, so the console treats every /api/v1 refusal alike.
        if self._token is None:
            raise FailedPrecondition("this balancer runs without an admin token", reason="NO_ADMIN_TOKEN")
        token = bearer(request.headers.get("Authorization"))
        if not token:
            raise Unauthenticated("missing bearer token: send 'Authorization: Bearer <admin token>'")
        if not hmac.compare_digest(token.encode(), self._token):
            raise Unauthenticated("invalid bearer token", reason="INVALID_TOKEN")

    async def handle(self, request: web.Request) -> web.Response:
        try:
            self._check_admin(request)
            wanted = request.query.get("deployment", "")
            targets = [(model.name, endpoint) for model in self._discovery.models()
                       if not wanted or model.name == wanted
                       for endpoint in self._discovery.registered_endpoints(model.name)]
        except ClowderError as err:
            return error_response(err)
        replicas = await asyncio.gather(*(self._one(name, endpoint.replica_id, endpoint.address)
                                          for name, endpoint in targets))
        return web.json_response({"time": time.time(), "replicas": list(replicas)})

    async def _one(self, deployment: str, replica_id: str, address: str) -> dict:
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
