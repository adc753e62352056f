"""The balancer's control-plane REST gateway (/api/v1): see api.py for what it serves.

The generic google.api.http transcoding (templates, routes, transcoding, OpenAPI) is the clowder_common.rest
library; the routes that are Clowder's own and not annotated RPCs live here, beside the service that serves them.
"""

from clowder_balancer.gateway.api import CONTROLLER_SERVICES, PREFIX, gateway_targets, install_gateway
from clowder_balancer.gateway.runtime_stats import RuntimeStatsApi
from clowder_balancer.gateway.workers import Workers

__all__ = ["CONTROLLER_SERVICES", "PREFIX", "gateway_targets", "install_gateway", "RuntimeStatsApi", "Workers"]
