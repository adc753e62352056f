"""What the sync and asyncio clients share: retry policy, request building, result types."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

import tenacity

from clowder.balancer.v1 import inference_pb2
from clowder.controller.v1 import resources_pb2
from clowder.runtime.v1 import runtime_pb2
from clowder_common.errors import Unavailable

Message = Mapping[str, str] | tuple[str, str] | runtime_pb2.ChatMessage
_SAMPLING_FIELDS = frozenset(f.name for f in runtime_pb2.SamplingParams.DESCRIPTOR.fields)
_FINISH = {runtime_pb2.FINISH_REASON_STOP: "stop", runtime_pb2.FINISH_REASON_LENGTH: "length"}


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_prompt_tokens: int = 0


@dataclass(frozen=True)
class Chunk:
    """One streamed piece; the last one of a stream has `finish_reason` and `usage`."""

    id: str
    model: str
    text: str
    finish_reason: str | None = None
    usage: Usage | None = None


@dataclass(frozen=True)
class Completion:
    id: str
    model: str
    text: str
    finish_reason: str | None
    usage: Usage = field(default_factory=Usage)


def retrying_kwargs(deadline: float, max_attempts: int) -> dict[str, Any]:
    """tenacity settings for idempotent calls: only UNAVAILABLE, backoff with jitter, never past `deadline`.

    `deadline` is a time.monotonic() value.
    """
    backoff = tenacity.wait_exponential_jitter(multiplier=0.1, max=2.0)

    def wait(retry_state: tenacity.RetryCallState) -> float:
        # The server's RetryInfo, when it sent one, beats our own backoff; neither sleeps past the deadline.
        exc = retry_state.outcome.exception() if retry_state.outcome else None
        hinted = getattr(exc, "retry_after", None)
        delay = min(hinted, 5.0) if hinted else backoff(retry_state)
        return max(0.0, min(delay, deadline - time.monotonic()))

    def out_of_time(retry_state: tenacity.RetryCallState) -> bool:
        return time.monotonic() >= deadline

    return dict(
        retry=tenacity.retry_if_exception(lambda exc: isinstance(exc, Unavailable)),
        stop=tenacity.stop_after_attempt(max_attempts) | out_of_time,
        wait=wait,
        reraise=True,
    )


def chat_messages(messages: Iterable[Message]) -> list[runtime_pb2.ChatMessage]:
    out = []
    for message in messages:
        if isinstance(message, runtime_pb2.ChatMessage):
            out.append(message)
        elif isinstance(message, tuple):
            out.append(runtime_pb2.ChatMessage(role=message[0], content=message[1]))
        else:
            out.append(runtime_pb2.ChatMessage(role=message["role"], content=message["content"]))
    return out


def sampling(params: Mapping[str, Any]) -> runtime_pb2.SamplingParams:
    """Keyword arguments named like SamplingParams fields (max_tokens, temperature, stop, seed, ...)."""
    unknown = sorted(set(params) - _SAMPLING_FIELDS)
    if unknown:
        raise TypeError(f"unknown sampling parameter(s) {', '.join(unknown)}; known: {', '.join(sorted(_SAMPLING_FIELDS))}")
    values = {k: v for k, v in params.items() if v is not None}
    if isinstance(values.get("stop"), str):
        values["stop"] = [values["stop"]]
    return runtime_pb2.SamplingParams(**values)


def chat_request(model: str, messages: Iterable[Message], params: Mapping[str, Any]
                 ) -> inference_pb2.CreateChatCompletionRequest:
    return inference_pb2.CreateChatCompletionRequest(model=model, messages=chat_messages(messages),
                                                     sampling=sampling(params))


def completion_request(model: str, prompt: str, params: Mapping[str, Any]) -> inference_pb2.CreateCompletionRequest:
    return inference_pb2.CreateCompletionRequest(model=model, prompt=prompt, sampling=sampling(params))


def chunk_of(reply) -> Chunk:
    text = reply.delta if isinstance(reply, inference_pb2.CreateChatCompletionResponse) else reply.text
    finish = _FINISH.get(reply.finish_reason)
    usage = None
    if reply.HasField("usage"):
        usage = Usage(reply.usage.prompt_tokens, reply.usage.completion_tokens,
                      getattr(reply.usage, "cached_prompt_tokens", 0))
    return Chunk(reply.id, reply.model, text, finish, usage)


class Collector:
    """Joins chunks into one Completion."""

    def __init__(self) -> None:
        self.parts: list[str] = []
        self.last: Chunk | None = None

    def add(self, chunk: Chunk) -> None:
        self.parts.append(chunk.text)
        self.last = chunk

    def result(self) -> Completion:
        last = self.last or Chunk("", "", "")
        return Completion(last.id, last.model, "".join(self.parts), last.finish_reason, last.usage or Usage())


def deployment(name: str, image: str | None, replicas: int) -> resources_pb2.Deployment:
    return resources_pb2.Deployment(name=name, image=image or name, replicas=replicas)


def image(alias: str, source_url: str, configuration: resources_pb2.ImageConfiguration | Mapping[str, Any] | None,
          credentials_ref: str = "", credentials_username: str = "") -> resources_pb2.Image:
    result = resources_pb2.Image(alias=alias, source_url=source_url, credentials_ref=credentials_ref,
                                 credentials_username=credentials_username)
    if isinstance(configuration, resources_pb2.ImageConfiguration):
        result.configuration.CopyFrom(configuration)
    elif configuration:
        result.configuration.CopyFrom(resources_pb2.ImageConfiguration(**configuration))
    return result


__all__ = ["Usage", "Chunk", "Completion"]
