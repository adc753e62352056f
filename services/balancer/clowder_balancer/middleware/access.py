"""Group access control: only API keys in one of the allowed groups may use the aimage."""

from __future__ import annotations

from typing import Any, Iterable, Mapping

from clowder.runtime.v1 import runtime_pb2
from clowder_common.errors import PermissionDenied, Unauthenticated

from clowder_balancer.middleware.base import BaseStage, RequestContext, bad_option, strings


class GroupAccessStage(BaseStage):
    """Options: allowed (list of group names). Anonymous callers are refused (401), keys outside the groups 403."""

    name = "groups"

    def __init__(self, options: Mapping[str, Any] | None = None, allowed: Iterable[str] | None = None) -> None:
        self.allowed = frozenset(allowed if allowed is not None else strings(options or {}, "allowed", self.name))
        if not self.allowed:
            raise bad_option(self.name, "'allowed' must name at least one group")

    async def before(self, ctx: RequestContext, request: runtime_pb2.GenerateRequest) -> None:
        self._check(ctx)

    async def before_embed(self, ctx: RequestContext, request: runtime_pb2.EmbedRequest) -> None:
        self._check(ctx)

    def _check(self, ctx: RequestContext) -> None:
        if ctx.principal.anonymous:
            raise Unauthenticated(f"model '{ctx.model}' needs an API key", reason="API_KEY_REQUIRED")
        if not ctx.principal.groups & self.allowed:
            raise PermissionDenied(f"this API key may not use model '{ctx.model}'", reason="GROUP_NOT_ALLOWED",
                                   metadata={"model": ctx.model})
