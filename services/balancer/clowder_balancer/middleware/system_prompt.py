"""System prompt stage: puts the operator's system message first in every chat request."""

from __future__ import annotations

from typing import Any, Mapping

from clowder.runtime.v1 import runtime_pb2

from clowder_balancer.middleware.base import BaseStage, RequestContext, bad_option, string


class SystemPromptStage(BaseStage):
    """Options: text (required); mode "prepend" (always, before the client's own system messages) or
    "if-missing" (only when the client sent none)."""

    name = "system-prompt"

    def __init__(self, options: Mapping[str, Any]) -> None:
        self.text = string(options, "text", self.name)
        self.mode = options.get("mode", "prepend")
        if self.mode not in ("prepend", "if-missing"):
            raise bad_option(self.name, "'mode' must be 'prepend' or 'if-missing'")

    async def before(self, ctx: RequestContext, request: runtime_pb2.GenerateRequest) -> None:
        if not request.HasField("chat"):
            return
        messages = request.chat.messages
        if self.mode == "if-missing" and any(m.role == "system" for m in messages):
            return
        kept = list(messages)
        del messages[:]
        messages.append(runtime_pb2.ChatMessage(role="system", content=self.text))
        messages.extend(kept)
        ctx.prepended += 1
