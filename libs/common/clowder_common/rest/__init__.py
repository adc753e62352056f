"""REST bridge (grpc-gateway style) and its OpenAPI document, generated from google.api.http annotations.

A library: it knows no product service. A service that serves a gateway (the balancer's
clowder_balancer.gateway) names its targets and adds its own hand-made routes as RestRoutes.
Modules: template (path templates), routes (annotations to routes), transcode (HTTP <-> messages),
openapi (the document), responses (google.rpc.Status answers), bridge (the aiohttp handlers).
"""

from clowder_common.rest.bridge import BridgeOptions, RestBridge, RestRoutes, call_metadata, install_rest_bridge
from clowder_common.rest.openapi import STATUS_SCHEMA, error_response_spec, openapi_document
from clowder_common.rest.responses import error_response, rpc_error_response, status_response
from clowder_common.rest.routes import Route, resolve_services, routes_of

__all__ = ["BridgeOptions", "RestBridge", "RestRoutes", "call_metadata", "install_rest_bridge", "STATUS_SCHEMA",
           "error_response_spec", "openapi_document", "error_response", "rpc_error_response", "status_response",
           "Route", "resolve_services", "routes_of"]
