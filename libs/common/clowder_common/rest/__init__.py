"""REST bridge (grpc-gateway style) and OpenAPI document generated from google.api.http annotations."""

# The controller's services are the bridge's usual targets: register their descriptors.
import clowder.controller.v1.controller_pb2  # noqa: F401
from clowder_common.rest.bridge import BridgeOptions, RestBridge, install_rest_bridge
from clowder_common.rest.openapi import openapi_document
from clowder_common.rest.routes import Route, resolve_services, routes_of

CONTROLLER_SERVICES = (
    "clowder.controller.v1.ImageService",
    "clowder.controller.v1.DeploymentService",
    "clowder.controller.v1.NodeService",
    "clowder.controller.v1.ServingService",
)

__all__ = ["BridgeOptions", "RestBridge", "install_rest_bridge", "openapi_document", "Route",
           "resolve_services", "routes_of", "CONTROLLER_SERVICES"]
