"""Regex blocklist on input and output; on streams it holds back just enough text that a match split across
chunks is still caught whole, so no match ever reaches the client."""

from __future__ import annotations

import re
from typing import Any, Mapping

from clowder.runtime.v1 import runtime_pb2
from clowder_common.errors import InvalidArgument

from clowder_balancer.middleware.base import BaseStage, RequestContext, bad_option, number, strings

MAX_PATTERNS = 256


class StreamRedactor:
    """Replaces every match of `pattern` in a text that arrives in pieces.

    Holds back the last max_match-1 characters: a match that is not complete yet must start there.
    Matches longer than `max_match` characters are the one thing it cannot promise to catch.
    """

    def __init__(self, pattern: re.Pattern[str], replacement: str, max_match: int) -> None:
        self._pattern = pattern
        self._replacement = replacement
        self._hold = max(0, max_match - 1)
        self._buffer = ""

    def feed(self, text: str) -> str:
        self._buffer += text
        # Replace what is complete; scan again from where the last replacement ended.
        out: list[str] = []
        position = 0
        for match in self._pattern.finditer(self._buffer):
            if match.end() == match.start():
                continue
            out.append(self._buffer[position:match.start()])
            out.append(self._replacement)
            position = match.end()
        rest = self._buffer[position:]
        safe = max(0, len(rest) - self._hold)
        out.append(rest[:safe])
        self._buffer = rest[safe:]
        return "".join(out)

    def flush(self) -> str:
        rest, self._buffer = self._buffer, ""
        return self._pattern.sub(self._replacement, rest)


class BlocklistStage(BaseStage):
    """Options: patterns (regexes, case-insensitive), input ("reject" | "allow", default reject), output
    ("redact" | "allow", default redact), replacement (default "[blocked]"), max_match_chars (default 128)."""

    name = "blocklist"

    def __init__(self, options: Mapping[str, Any]) -> None:
        patterns = strings(options, "patterns", self.name)
        if not patterns or len(patterns) > MAX_PATTERNS:
            raise bad_option(self.name, f"'patterns' must hold 1 to {MAX_PATTERNS} regexes")
        try:
            self.pattern = re.compile("|".join(f"(?:{p})" for p in patterns), re.IGNORECASE)
        except re.error as exc:
            raise bad_option(self.name, f"bad pattern: {exc}") from None
        self.input_mode = options.get("input", "reject")
        self.output_mode = options.get("output", "redact")
        if self.input_mode not in ("reject", "allow") or self.output_mode not in ("redact", "allow"):
            raise bad_option(self.name, "'input' is reject|allow and 'output' is redact|allow")
        replacement = options.get("replacement", "[blocked]")
        if not isinstance(replacement, str):
            raise bad_option(self.name, "'replacement' must be a string")
        self.replacement = replacement
        self.max_match = int(number(options, "max_match_chars", self.name, 128, 1, 10_000))

    async def before(self, ctx: RequestContext, request: runtime_pb2.GenerateRequest) -> None:
        if self.input_mode != "reject":
            return
        texts = [m.content for m in request.chat.messages] if request.HasField("chat") else [request.prompt]
        for i, text in enumerate(texts):
            if self.pattern.search(text):
                if not request.HasField("chat"):
                    field = "prompt"
                elif i < ctx.prepended:
                    field = "configuration.middleware"  # the operator's own text trips the operator's list
                else:
                    field = f"messages[{i - ctx.prepended}].content"
                # The message does not quote the match: it may be the very thing that must not spread.
                raise InvalidArgument("the request contains blocked content", field=field, reason="CONTENT_BLOCKED")

    async def before_embed(self, ctx: RequestContext, request: runtime_pb2.EmbedRequest) -> None:
        if self.input_mode != "reject":
            return
        for i, text in enumerate(request.inputs):
            if self.pattern.search(text):
                raise InvalidArgument("the request contains blocked content", field=f"input[{i}]",
                                      reason="CONTENT_BLOCKED")

    def output_filter(self, ctx: RequestContext) -> StreamRedactor | None:
        if self.output_mode != "redact":
            return None
        return StreamRedactor(self.pattern, self.replacement, self.max_match)
