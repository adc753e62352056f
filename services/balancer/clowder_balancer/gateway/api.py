"""The balancer's /api/v1: one REST gateway over the control plane, served on the balancer's HTTP port.

What it serves, in the order aiohttp tries them:
- /api/v1/openapi.json: one OpenAPI 3 document for everything below;
- /api/v1/runtime-stats (runtime_stats.py): each ready replica's GetStats, read by this balancer;
- /api/v1/workers, /api/v1/workers/list (workers.py): the original Clowder API, when the controller is reachable;
- every google.api.http-annotated RPC of the target services (clowder_common.rest's bridge): this balancer's
  ApiKeyService, and the controller's services when `controller_address` is set.
"""

from __future__ import annotations

from typing import Mapping

from aiohttp import web

import clowder.controller.v1.adapters_pb2  # noqa: F401  (as controller_pb2)
import clowder.controller.v1.controller_pb2  # noqa: F401  (registers the controller's services for the bridge)
from clowder_common.rest import BridgeOptions, RestBridge, RestRoutes, install_rest_bridge
from clowder_common.security import NO_SECURITY, ClusterSecurity

from clowder_balancer.apikeys import SERVICE_NAME as API_KEY_SERVICE
from clowder_balancer.gateway.runtime_stats import RuntimeStatsApi
from clowder_balancer.gateway.workers import Workers

PREFIX = "/api/v1"
TITLE = "Clowder control plane"
CONTROLLER_SERVICES = (
    "clowder.controller.v1.ImageService",
    "clowder.controller.v1.DeploymentService",
    "clowder.controller.v1.NodeService",
    "clowder.controller.v1.ServingService",
    "clowder.controller.v1.AdapterService",
)


def gateway_targets(own_grpc_address: str, controller_address: str) -> dict[str, str]:
    """{service: gRPC address}: this balancer's ApiKeyService, and the controller's services if it has one."""
    targets = {API_KEY_SERVICE: own_grpc_address}
    if controller_address:
        targets.update(dict.fromkeys(CONTROLLER_SERVICES, controller_address))
    return targets


def install_gateway(app: web.Application, targets: Mapping[str, str], *, security: ClusterSecurity = NO_SECURITY,
                    runtime_stats: RuntimeStatsApi | None = None) -> RestBridge:
    """Serve the gateway on `app` (after any route of `app` that must win over its /api/v1 catch-all)."""
    bridge = RestBridge(PREFIX, targets, options=BridgeOptions(security=security))
    extra: list[RestRoutes] = []
    if runtime_stats is not None:
        extra.append(runtime_stats)
    if Workers.supported(bridge):
        extra.append(Workers(bridge))
    return install_rest_bridge(app, bridge, title=TITLE, extra=extra)
