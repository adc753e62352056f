"""clowder_common.rest as a library: a bridge over any annotated services, its checks at construction."""

from __future__ import annotations

import pytest

from clowder_balancer.apikeys import SERVICE_NAME as API_KEY_SERVICE
from clowder_common.rest import BridgeOptions, RestBridge, resolve_services

pytestmark = pytest.mark.unit


def test_a_bridge_looks_its_services_up_and_defaults_its_options():
    bridge = RestBridge("/api/v1/", {API_KEY_SERVICE: "127.0.0.1:9"})
    assert bridge.prefix == "/api/v1" and bridge.options == BridgeOptions()
    assert [s.full_name for s in bridge.services] == [API_KEY_SERVICE]
    assert {r.operation_id for r in bridge.routes} >= {"ApiKeyService_CreateApiKey", "ApiKeyService_ListApiKeys"}


def test_a_service_without_an_address_or_a_route_outside_the_prefix_is_refused():
    services = resolve_services([API_KEY_SERVICE])
    with pytest.raises(ValueError, match="no gRPC address for clowder.balancer.v1.ApiKeyService"):
        RestBridge("/api/v1", {}, services)
    with pytest.raises(ValueError, match="is outside /api/v2/"):
        RestBridge("/api/v2", {API_KEY_SERVICE: "127.0.0.1:9"})
    with pytest.raises(ValueError, match="unknown gRPC service"):
        RestBridge("/api/v1", {"no.such.Service": "127.0.0.1:9"})
