"""What the sync and asyncio clients share: retry policy, request building, result types."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

import tenacity
from google.protobuf import field_mask_pb2, struct_pb2

from clowder.balancer.v1 import apikeys_pb2, inference_pb2
from clowder.controller.v1 import controller_pb2, resources_pb2
from clowder.runtime.v1 import runtime_pb2
from clowder_common.errors import Unavailable

Message = Mapping[str, Any] | tuple[str, str] | runtime_pb2.ChatMessage
# An OpenAI tool definition: {"type": "function", "function": {"name", "description", "parameters"}}.
Tool = Mapping[str, Any]
# "auto", "none", "required", a function's name, or OpenAI's {"type": "function", "function": {"name": ...}}.
ToolChoiceSpec = str | Mapping[str, Any]
_SAMPLING_FIELDS = frozenset(f.name for f in runtime_pb2.SamplingParams.DESCRIPTOR.fields)
_FINISH = {runtime_pb2.FINISH_REASON_STOP: "stop", runtime_pb2.FINISH_REASON_LENGTH: "length",
           runtime_pb2.FINISH_REASON_TOOL_CALLS: "tool_calls"}
_TOOL_MODES = {"auto": runtime_pb2.ToolChoice.MODE_AUTO, "none": runtime_pb2.ToolChoice.MODE_NONE,
               "required": runtime_pb2.ToolChoice.MODE_REQUIRED}


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_prompt_tokens: int = 0


@dataclass(frozen=True)
class TopLogprob:
    token: str
    logprob: float


@dataclass(frozen=True)
class TokenLogprob:
    """A generated token, its log probability, and the likeliest alternatives (with `top_logprobs=`)."""

    token: str
    logprob: float
    top: tuple[TopLogprob, ...] = ()


@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    # The arguments as the model wrote them: a JSON object, serialized.
    arguments: str

    def parsed_arguments(self) -> Any:
        return json.loads(self.arguments)


@dataclass(frozen=True)
class Chunk:
    """One streamed piece of choice `index`; each choice's last chunk has `finish_reason` and `usage`."""

    id: str
    model: str
    text: str
    finish_reason: str | None = None
    usage: Usage | None = None
    index: int = 0
    logprobs: tuple[TokenLogprob, ...] = ()
    tool_calls: tuple[ToolCall, ...] = ()


@dataclass(frozen=True)
class Choice:
    index: int
    text: str
    finish_reason: str | None
    logprobs: tuple[TokenLogprob, ...] = ()
    tool_calls: tuple[ToolCall, ...] = ()


@dataclass(frozen=True)
class Completion:
    """A finished generation; `text`, `finish_reason`, `logprobs` and `tool_calls` are choice 0's."""

    id: str
    model: str
    text: str
    finish_reason: str | None
    usage: Usage = field(default_factory=Usage)
    choices: tuple[Choice, ...] = ()
    logprobs: tuple[TokenLogprob, ...] = ()
    tool_calls: tuple[ToolCall, ...] = ()


@dataclass(frozen=True)
class Embeddings:
    model: str
    # One vector per input, in input order.
    vectors: list[list[float]]
    prompt_tokens: int


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
        # tenacity types `|` for its own stop classes; it takes any stop callable, as here.
        stop=tenacity.stop_after_attempt(max_attempts) | out_of_time,  # type: ignore[operator]
        wait=wait,
        reraise=True,
    )


def chat_messages(messages: Iterable[Message]) -> list[runtime_pb2.ChatMessage]:
    """(role, content) pairs, ChatMessages, or OpenAI-shaped dicts (with tool_calls / tool_call_id / name)."""
    out = []
    for message in messages:
        if isinstance(message, runtime_pb2.ChatMessage):
            out.append(message)
        elif isinstance(message, tuple):
            out.append(runtime_pb2.ChatMessage(role=message[0], content=message[1]))
        else:
            calls = [_tool_call_message(call) for call in message.get("tool_calls") or ()]
            out.append(runtime_pb2.ChatMessage(
                role=message["role"], content=message.get("content") or "", tool_calls=calls,
                tool_call_id=message.get("tool_call_id") or "", name=message.get("name") or ""))
    return out


def _tool_call_message(call: ToolCall | Mapping[str, Any]) -> runtime_pb2.ToolCall:
    if isinstance(call, ToolCall):
        return runtime_pb2.ToolCall(id=call.id, name=call.name, arguments=call.arguments)
    function = call.get("function") or {}
    arguments = function.get("arguments", "{}")
    if not isinstance(arguments, str):
        arguments = json.dumps(arguments)
    return runtime_pb2.ToolCall(id=call.get("id", ""), name=function.get("name", ""), arguments=arguments)


def tool_structs(tools: Iterable[Tool] | None) -> list[struct_pb2.Struct]:
    out = []
    for tool in tools or ():
        struct = struct_pb2.Struct()
        struct.update(dict(tool))
        out.append(struct)
    return out


def tool_choice(spec: ToolChoiceSpec | None) -> runtime_pb2.ToolChoice | None:
    if spec is None:
        return None
    if isinstance(spec, str):
        if spec in _TOOL_MODES:
            return runtime_pb2.ToolChoice(mode=_TOOL_MODES[spec])
        return runtime_pb2.ToolChoice(mode=runtime_pb2.ToolChoice.MODE_FUNCTION, function_name=spec)
    name = (spec.get("function") or {}).get("name")
    if not isinstance(name, str) or not name:
        raise TypeError("tool_choice must be 'auto', 'none', 'required', a function name, "
                        "or {'type': 'function', 'function': {'name': ...}}")
    return runtime_pb2.ToolChoice(mode=runtime_pb2.ToolChoice.MODE_FUNCTION, function_name=name)


def sampling(params: Mapping[str, Any]) -> runtime_pb2.SamplingParams:
    """Keyword arguments named like SamplingParams fields (max_tokens, temperature, stop, seed, ...)."""
    unknown = sorted(set(params) - _SAMPLING_FIELDS)
    if unknown:
        raise TypeError(f"unknown sampling parameter(s) {', '.join(unknown)}; known: {', '.join(sorted(_SAMPLING_FIELDS))}")
    values = {k: v for k, v in params.items() if v is not None}
    if isinstance(values.get("stop"), str):
        values["stop"] = [values["stop"]]
    return runtime_pb2.SamplingParams(**values)


def chat_request(model: str, messages: Iterable[Message], params: Mapping[str, Any], n: int | None = None,
                 tools: Iterable[Tool] | None = None, choice: ToolChoiceSpec | None = None
                 ) -> inference_pb2.CreateChatCompletionRequest:
    request = inference_pb2.CreateChatCompletionRequest(model=model, messages=chat_messages(messages),
                                                        sampling=sampling(params), n=n or 0,
                                                        tools=tool_structs(tools))
    resolved = tool_choice(choice)
    if resolved is not None:
        request.tool_choice.CopyFrom(resolved)
    return request


def completion_request(model: str, prompt: str, params: Mapping[str, Any], n: int | None = None
                       ) -> inference_pb2.CreateCompletionRequest:
    return inference_pb2.CreateCompletionRequest(model=model, prompt=prompt, sampling=sampling(params), n=n or 0)


def _logprobs(entries) -> tuple[TokenLogprob, ...]:
    return tuple(TokenLogprob(e.token, e.logprob, tuple(TopLogprob(t.token, t.logprob) for t in e.top_logprobs))
                 for e in entries)


def chunk_of(reply) -> Chunk:
    chat = isinstance(reply, inference_pb2.CreateChatCompletionResponse)
    text = reply.delta if chat else reply.text
    finish = _FINISH.get(reply.finish_reason)
    usage = None
    if reply.HasField("usage"):
        usage = Usage(reply.usage.prompt_tokens, reply.usage.completion_tokens,
                      getattr(reply.usage, "cached_prompt_tokens", 0))
    calls = tuple(ToolCall(c.id, c.name, c.arguments) for c in reply.tool_calls) if chat else ()
    return Chunk(reply.id, reply.model, text, finish, usage, reply.index, _logprobs(reply.logprobs), calls)


class Collector:
    """Joins chunks into one Completion, choice by choice; usage is summed over the choices."""

    def __init__(self) -> None:
        self.parts: dict[int, list[Chunk]] = {}
        self.last: Chunk | None = None

    def add(self, chunk: Chunk) -> None:
        self.parts.setdefault(chunk.index, []).append(chunk)
        self.last = chunk

    def result(self) -> Completion:
        last = self.last or Chunk("", "", "")
        choices = []
        prompt = completion = cached = 0
        for index in sorted(self.parts):
            chunks = self.parts[index]
            ending = next((c for c in reversed(chunks) if c.finish_reason), None)
            choices.append(Choice(index, "".join(c.text for c in chunks), ending.finish_reason if ending else None,
                                  tuple(lp for c in chunks for lp in c.logprobs),
                                  tuple(call for c in chunks for call in c.tool_calls)))
            usage = next((c.usage for c in reversed(chunks) if c.usage), None)
            if usage is not None:
                # Every choice saw the same prompt: count it once.
                prompt, cached = usage.prompt_tokens, usage.cached_prompt_tokens
                completion += usage.completion_tokens
        first = choices[0] if choices else Choice(0, "", None)
        return Completion(last.id, last.model, first.text, first.finish_reason, Usage(prompt, completion, cached),
                          tuple(choices), first.logprobs, first.tool_calls)


def embedding_request(model: str, inputs: str | Iterable[str]) -> inference_pb2.CreateEmbeddingRequest:
    """One text or several."""
    return inference_pb2.CreateEmbeddingRequest(model=model, inputs=[inputs] if isinstance(inputs, str) else inputs)


def embeddings_of(reply: inference_pb2.CreateEmbeddingResponse) -> Embeddings:
    return Embeddings(reply.model, [list(e.values) for e in reply.embeddings], reply.prompt_tokens)


def api_key_request(description: str, groups: Iterable[str]) -> apikeys_pb2.CreateApiKeyRequest:
    return apikeys_pb2.CreateApiKeyRequest(description=description, groups=list(groups))


# Deployment fields that say how each replica runs llama.cpp; None leaves one unset (the aimage's applies).
RUNTIME_SETTINGS = ("slots", "threads", "context_size", "batch_size")


def deployment(name: str, image: str | None, replicas: int, settings: Mapping[str, int | None] | None = None
               ) -> resources_pb2.Deployment:
    given: dict[str, Any] = {k: v for k, v in (settings or {}).items() if v is not None}
    return resources_pb2.Deployment(name=name, image=image or name, replicas=replicas, **given)


def update_request(name: str, replicas: int | None, image: str | None, settings: Mapping[str, int | None],
                   clear: Iterable[str] = ()) -> controller_pb2.UpdateDeploymentRequest:
    """An UpdateDeployment naming (in its mask) exactly the fields given, and the settings to unset."""
    fields: dict[str, Any] = {k: v for k, v in settings.items() if v is not None}
    if replicas is not None:
        fields["replicas"] = replicas
    if image:
        fields["image"] = image
    cleared = set(clear) - set(fields)
    unknown = cleared - set(RUNTIME_SETTINGS)
    if unknown:
        raise ValueError(f"only runtime settings can be cleared ({', '.join(RUNTIME_SETTINGS)}), not {sorted(unknown)}")
    return controller_pb2.UpdateDeploymentRequest(
        deployment=resources_pb2.Deployment(name=name, **fields),
        update_mask=field_mask_pb2.FieldMask(paths=sorted(set(fields) | cleared)))


def image(alias: str, source_url: str, configuration: resources_pb2.ImageConfiguration | Mapping[str, Any] | None,
          credentials_ref: str = "", credentials_username: str = "") -> resources_pb2.Image:
    result = resources_pb2.Image(alias=alias, source_url=source_url, credentials_ref=credentials_ref,
                                 credentials_username=credentials_username)
    if isinstance(configuration, resources_pb2.ImageConfiguration):
        result.configuration.CopyFrom(configuration)
    elif configuration:
        result.configuration.CopyFrom(resources_pb2.ImageConfiguration(**configuration))
    return result


__all__ = ["Usage", "Chunk", "Choice", "Completion", "Embeddings", "TokenLogprob", "TopLogprob", "ToolCall"]
