"""What a middleware stage sees and may do: change the request, filter the output stream, observe the outcome."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Mapping, Protocol, overload

from clowder.runtime.v1 import runtime_pb2
from clowder_common.errors import InvalidArgument

from clowder_balancer.apikeys import ANONYMOUS, Principal


@dataclass
class RequestContext:
    request_id: str
    model: str
    # "http" or "grpc".
    api: str
    principal: Principal = ANONYMOUS
    started: float = field(default_factory=time.time)
    # Filled in as the request runs; stages read them in after().
    status: int = 0
    error: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    # Choice 0's finish reason and text (what most requests have); `choices` holds every choice's.
    finish_reason: str = ""
    output: list[str] = field(default_factory=list)
    # Per choice index, when the request asked for n > 1: (finish reason, text pieces).
    choices: dict[int, tuple[str, list[str]]] = field(default_factory=dict)
    # The GenerateRequest, or the EmbedRequest of an embeddings call.
    request: runtime_pb2.GenerateRequest | runtime_pb2.EmbedRequest | None = None
    # Messages stages put before the client's, so errors can still name the client's own fields.
    prepended: int = 0

    @property
    def output_text(self) -> str:
        return "".join(self.output)

    def choice_records(self) -> list[dict[str, Any]]:
        """Every choice of an n > 1 request as {index, finish_reason, output}; [] for a single choice."""
        return [{"index": index, "finish_reason": reason or None, "output": "".join(pieces)}
                for index, (reason, pieces) in sorted(self.choices.items())]


class OutputFilter(Protocol):
    def feed(self, text: str) -> str:
        """Take the next piece of output; return what may be shown now."""
        ...

    def flush(self) -> str:
        """The stream ended: return whatever was held back."""
        ...


class Stage(Protocol):
    name: str

    async def before(self, ctx: RequestContext, request: runtime_pb2.GenerateRequest) -> None:
        """Change `request` in place, or raise a ClowderError to refuse it."""
        ...

    async def before_embed(self, ctx: RequestContext, request: runtime_pb2.EmbedRequest) -> None:
        """The same for an embeddings request (only stages that judge callers or inputs act on it)."""
        ...

    def output_filter(self, ctx: RequestContext) -> OutputFilter | None: ...

    def after(self, ctx: RequestContext) -> None:
        """The request is over (any outcome). Must not block: schedule slow work."""
        ...


class BaseStage:
    """Default no-op hooks, so each stage implements only what it does."""

    name = "base"

    async def before(self, ctx: RequestContext, request: runtime_pb2.GenerateRequest) -> None:
        return None

    async def before_embed(self, ctx: RequestContext, request: runtime_pb2.EmbedRequest) -> None:
        return None

    def output_filter(self, ctx: RequestContext) -> OutputFilter | None:
        return None

    def after(self, ctx: RequestContext) -> None:
        return None


def bad_option(stage: str, message: str) -> InvalidArgument:
    return InvalidArgument(f"middleware '{stage}': {message}", field="configuration.middleware")


@overload
def number(options: Mapping[str, Any], key: str, stage: str, default: float, low: float = ...,
           high: float = ...) -> float: ...


@overload
def number(options: Mapping[str, Any], key: str, stage: str, default: None = None, low: float = ...,
           high: float = ...) -> float | None: ...


def number(options: Mapping[str, Any], key: str, stage: str, default: float | None = None,
           low: float = 0.0, high: float = float("inf")) -> float | None:
    value = options.get(key, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise bad_option(stage, f"'{key}' must be a number in [{low:g}, {high:g}]")
    return float(value)


def string(options: Mapping[str, Any], key: str, stage: str, default: str | None = None) -> str:
    value = options.get(key, default)
    if not isinstance(value, str) or not value:
        raise bad_option(stage, f"'{key}' must be a non-empty string")
    return value


def strings(options: Mapping[str, Any], key: str, stage: str) -> list[str]:
    value = options.get(key, [])
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) and v for v in value):
        raise bad_option(stage, f"'{key}' must be a list of non-empty strings")
    return list(value)
