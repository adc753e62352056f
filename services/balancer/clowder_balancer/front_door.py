"""What the balancer's two inference faces share (the OpenAI HTTP API and the gRPC InferenceService): routing,
the middleware pipeline, metrics, and who the caller is."""

from __future__ import annotations

from clowder_balancer.apikeys import ApiKeyStore, Principal, bearer
from clowder_balancer.discovery import Discovery
from clowder_balancer.metrics import Metrics
from clowder_balancer.pipeline import Pipeline
from clowder_balancer.router import Router


class FrontDoor:
    """Base of both faces: one place that holds their parts and authenticates a caller."""

    def __init__(self, router: Router, discovery: Discovery, metrics: Metrics,
                 session_header: str = "x-session-id", pipeline: Pipeline | None = None,
                 keys: ApiKeyStore | None = None, require_api_keys: bool = False) -> None:
        self._router = router
        self._session_header = session_header
        self._pipeline = pipeline or Pipeline(router, discovery)
        self._keys = keys
        self._require_keys = require_api_keys
        self._discovery = discovery
        self._metrics = metrics

    def _caller(self, authorization: str | None) -> Principal:
        """Who sends `authorization`: Unauthenticated for a bad key, or for none when keys are required."""
        if self._keys is None:
            return Principal()
        return self._keys.authenticate(bearer(authorization), self._require_keys)
