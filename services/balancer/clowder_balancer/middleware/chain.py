"""Builds an aimage's stages from its configuration, once per distinct configuration (stages keep state)."""

from __future__ import annotations

import logging
from typing import Callable, Mapping

from google.protobuf import json_format

from clowder.controller.v1 import resources_pb2
from clowder_common.errors import ClowderError, Internal

from clowder_balancer.middleware.access import GroupAccessStage
from clowder_balancer.middleware.audit import AuditStage
from clowder_balancer.middleware.base import Stage, bad_option
from clowder_balancer.middleware.blocklist import BlocklistStage
from clowder_balancer.middleware.rate_limit import RateLimitStage
from clowder_balancer.middleware.system_prompt import SystemPromptStage
from clowder_balancer.middleware.webhook import WebhookStage
from clowder_balancer.tenancy.quota import QuotaLimiter

log = logging.getLogger(__name__)

STAGES: dict[str, Callable[[Mapping], Stage]] = {
    "system-prompt": SystemPromptStage,
    "groups": lambda options: GroupAccessStage(options),
    "rate-limit": RateLimitStage,
    "blocklist": BlocklistStage,
    "audit": AuditStage,
    "webhook": WebhookStage,
}


def build_stages(configuration: resources_pb2.ImageConfiguration, limiter: QuotaLimiter | None = None
                 ) -> list[Stage]:
    """allowed_groups first (nothing else should run for a caller who may not), then the listed stages in order."""
    stages: list[Stage] = []
    if configuration.allowed_groups:
        stages.append(GroupAccessStage(allowed=configuration.allowed_groups))
    for spec in configuration.middleware:
        factory = STAGES.get(spec.name)
        if factory is None:
            raise bad_option(spec.name, f"unknown stage; known: {', '.join(sorted(STAGES))}")
        options = json_format.MessageToDict(spec.options)
        # Rate limits count across all balancers through the balancer's limiter (etcd).
        stages.append(RateLimitStage(options, limiter) if spec.name == "rate-limit" else factory(options))
    return stages


class Chains:
    """Stages per model, rebuilt only when the model's configuration changes."""

    def __init__(self, limiter: QuotaLimiter | None = None) -> None:
        self._limiter = limiter
        self._built: dict[str, tuple[bytes, list[Stage] | ClowderError]] = {}
        self._seen: dict[str, tuple[resources_pb2.ImageConfiguration, list[Stage]]] = {}

    def stages(self, model: str, configuration: resources_pb2.ImageConfiguration) -> list[Stage]:
        # The same configuration object as last time (discovery's cache hands out its own) is unchanged:
        # no need to serialize it again on every request.
        seen = self._seen.get(model)
        if seen is not None and seen[0] is configuration:
            return seen[1]
        fingerprint = configuration.SerializeToString(deterministic=True)
        cached = self._built.get(model)
        if cached is None or cached[0] != fingerprint:
            try:
                built: list[Stage] | ClowderError = build_stages(configuration, self._limiter)
            except ClowderError as err:
                log.error("model %s has a bad middleware configuration: %s", model, err.message)
                built = err
            cached = self._built[model] = (fingerprint, built)
        if isinstance(cached[1], ClowderError):
            # Fail closed: a stage that was meant to guard the model must not silently go missing.
            raise Internal(f"model '{model}' has a middleware configuration this balancer cannot apply",
                           reason="BAD_MIDDLEWARE_CONFIGURATION")
        self._seen[model] = (configuration, cached[1])
        return cached[1]

    def all_stages(self) -> list[Stage]:
        return [s for _, built in self._built.values() if isinstance(built, list) for s in built]
