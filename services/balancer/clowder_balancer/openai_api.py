"""OpenAI wire format: request parsing and validation, response and SSE chunk shapes, error bodies (no I/O)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Literal

from clowder.runtime.v1 import runtime_pb2
from clowder_common.errors import HTTP_STATUS, ClowderError, InvalidArgument
from clowder_common.limits import (INT64_MAX, INT64_MIN, MAX_CHOICES, MAX_COMPLETION_LOGPROBS, MAX_TOP_LOGPROBS,
                                   UINT32_MAX)

from clowder_balancer import openai_logprobs, openai_tools, request_ids
from clowder_balancer.sampling import validate_sampling

Kind = Literal["chat", "completion"]

# "developer" is OpenAI's newer name for the system role.
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant", "tool": "tool"}

FINISH_REASONS: dict[int, str] = {
    runtime_pb2.FINISH_REASON_STOP: "stop",
    runtime_pb2.FINISH_REASON_LENGTH: "length",
    runtime_pb2.FINISH_REASON_TOOL_CALLS: "tool_calls",
}

SSE_DONE = b"data: [DONE]\n\n"


@dataclass(frozen=True)
class OpenAIRequest:
    kind: Kind
    model: str
    stream: bool
    include_usage: bool
    sampling: runtime_pb2.SamplingParams
    messages: tuple[runtime_pb2.ChatMessage, ...] = ()
    prompt: str = ""
    n: int = 1
    tools: tuple[dict[str, Any], ...] = ()
    tool_choice: runtime_pb2.ToolChoice | None = None

    @property
    def logprobs(self) -> bool:
        return self.sampling.logprobs

    def generate_request(self, request_id: str) -> runtime_pb2.GenerateRequest:
        request = runtime_pb2.GenerateRequest(request_id=request_id, sampling=self.sampling)
        if self.kind == "chat":
            request.chat.messages.extend(self.messages)
            if self.tools:
                request.chat.tools.extend(openai_tools.to_struct(t) for t in self.tools)
            if self.tool_choice is not None:
                request.chat.tool_choice.CopyFrom(self.tool_choice)
        else:
            request.prompt = self.prompt
        return request


# -- parsing ---------------------------------------------------------------------------------------


def _reject_constant(value: str) -> Any:
    raise ValueError(f"{value} is not valid JSON")


_DECODER = json.JSONDecoder(parse_constant=_reject_constant)


def decode_body(raw: bytes) -> dict[str, Any]:
    """The request body as a JSON object, or InvalidArgument (with no param, as OpenAI does)."""
    try:
        # json.loads with options builds a decoder per call; one shared decoder is a good part of a
        # small request's parse time. detect_encoding: what json.loads does with bytes.
        body = _DECODER.decode(raw.decode(json.detect_encoding(raw), "surrogatepass"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidArgument(
            f"We could not parse the JSON body of your request ({exc}). The body must be a JSON object."
        ) from None
    if not isinstance(body, dict):
        raise InvalidArgument("The request body must be a JSON object.")
    return body


def _bad(param: str, message: str) -> InvalidArgument:
    return InvalidArgument(message, field=param)


def _get(body: dict[str, Any], name: str, kind: type | tuple[type, ...], what: str, param: str = "") -> Any:
    """The value of optional field `name` (None when absent or null), type-checked; `param` names it in errors."""
    param = param or name
    value = body.get(name)
    if value is None:
        return None
    # JSON true/false are Python ints too; never let them pass as numbers.
    if isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
        raise _bad(param, f"Invalid type for '{param}': expected {what}, but got a boolean.")
    if not isinstance(value, kind):
        raise _bad(param, f"Invalid type for '{param}': expected {what}, but got {_json_type(value)}.")
    return value


def _json_type(value: Any) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return "null"


def _int_in(body: dict[str, Any], name: str, low: int, high: int) -> int | None:
    value = _get(body, name, int, "an integer")
    if value is not None and not low <= value <= high:
        raise _bad(name, f"Invalid '{name}': {value} is out of range [{low}, {high}].")
    return value


def _model(body: dict[str, Any]) -> str:
    model = _get(body, "model", str, "a string")
    if not model:
        raise _bad("model", "You must provide a model parameter.")
    return model


def _content(value: Any, param: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        texts = []
        for j, part in enumerate(value):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise _bad(f"{param}[{j}]", "Only text content parts ({\"type\": \"text\", \"text\": ...}) are supported.")
            texts.append(part["text"])
        return "\n".join(texts)
    raise _bad(param, f"Invalid type for '{param}': expected a string or an array of text parts.")


def _messages(body: dict[str, Any]) -> tuple[runtime_pb2.ChatMessage, ...]:
    messages = _get(body, "messages", list, "an array")
    if not messages:
        raise _bad("messages", "'messages' must be a non-empty array.")
    out = []
    tool_messages = False
    # Param names are made only for errors: a long conversation must not pay for them per message.
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict):
            raise _bad(f"messages[{i}]", f"Invalid type for 'messages[{i}]': expected an object, "
                       f"but got {_json_type(msg)}.")
        role = msg.get("role")
        if not isinstance(role, str) or role not in ROLES:
            raise _bad(f"messages[{i}].role", f"Invalid 'messages[{i}].role': expected one of {sorted(ROLES)}.")
        content = msg.get("content")
        if isinstance(content, str):
            text = content
        elif content is None:
            if role != "assistant":
                raise _bad(f"messages[{i}].content", f"'messages[{i}].content' is required for role '{role}'.")
            text = ""
        else:
            text = _content(content, f"messages[{i}].content")
        message = runtime_pb2.ChatMessage(role=ROLES[role], content=text)
        if role == "assistant" or role == "tool" or "name" in msg:
            tool_messages |= _message_extras(msg, role, message, i)
        out.append(message)
    if tool_messages:
        openai_tools.name_tool_messages(out)
    return tuple(out)


def _message_extras(msg: dict[str, Any], role: str, message: runtime_pb2.ChatMessage, i: int) -> bool:
    """Tool calls and tool results; True for a tool message."""
    if role == "assistant" and msg.get("tool_calls"):
        message.tool_calls.extend(openai_tools.parse_message_tool_calls(msg["tool_calls"],
                                                                        f"messages[{i}].tool_calls"))
    name = msg.get("name")
    if name is not None and not isinstance(name, str):
        raise _bad(f"messages[{i}].name", f"Invalid type for 'messages[{i}].name': expected a string.")
    if role != "tool":
        return False
    call_id = msg.get("tool_call_id")
    if not isinstance(call_id, str) or not call_id:
        raise _bad(f"messages[{i}].tool_call_id", f"Missing required parameter: 'messages[{i}].tool_call_id'.")
    message.tool_call_id = call_id
    if name:
        message.name = name
    return True


def _prompt(body: dict[str, Any]) -> str:
    if "prompt" not in body or body["prompt"] is None:
        raise _bad("prompt", "You must provide a prompt parameter.")
    prompt = body["prompt"]
    # A list of one string is what the OpenAI SDK sends for a single prompt in batch form.
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        return prompt[0]
    if isinstance(prompt, list) and len(prompt) != 1:
        raise _bad("prompt", "Only one prompt per request is supported.")
    if not isinstance(prompt, str):
        raise _bad("prompt", f"Invalid type for 'prompt': expected a string, but got {_json_type(prompt)}.")
    return prompt


def _stop(body: dict[str, Any]) -> list[str]:
    stop = _get(body, "stop", (str, list), "a string or an array of strings")
    if stop is None:
        return []
    if isinstance(stop, str):
        return [stop]
    if not all(isinstance(s, str) for s in stop):
        raise _bad("stop", "Invalid type for 'stop': expected a string or an array of strings.")
    return list(stop)


def _response_format(body: dict[str, Any]) -> runtime_pb2.ResponseFormat:
    spec = _get(body, "response_format", dict, "an object")
    if spec is None:
        return runtime_pb2.RESPONSE_FORMAT_UNSPECIFIED
    kind = spec.get("type")
    if kind == "text":
        return runtime_pb2.RESPONSE_FORMAT_TEXT
    if kind == "json_object":
        return runtime_pb2.RESPONSE_FORMAT_JSON_OBJECT
    if kind == "json_schema":
        raise _bad("response_format.type", "'json_schema' is not supported; use 'json_object'.")
    raise _bad("response_format.type", "Invalid 'response_format.type': expected 'text' or 'json_object'.")


def _logprobs(body: dict[str, Any], kind: Kind, sampling: runtime_pb2.SamplingParams) -> None:
    if kind == "chat":
        wanted = bool(_get(body, "logprobs", bool, "a boolean"))
        top = _int_in(body, "top_logprobs", 0, MAX_TOP_LOGPROBS)
        if top is not None and not wanted:
            raise _bad("top_logprobs", "'top_logprobs' requires 'logprobs' to be true.")
    else:
        # Legacy completions: logprobs is the number of most likely tokens to return per position.
        top = _int_in(body, "logprobs", 0, MAX_COMPLETION_LOGPROBS)
        wanted = top is not None
    if wanted:
        sampling.logprobs = True
        sampling.top_logprobs = top or 0


def _tools(body: dict[str, Any]) -> tuple[tuple[dict[str, Any], ...], runtime_pb2.ToolChoice | None]:
    if body.get("functions") is not None or body.get("function_call") is not None:
        name = "functions" if body.get("functions") is not None else "function_call"
        raise _bad(name, f"'{name}' (deprecated) is not supported; use 'tools' and 'tool_choice'.")
    tools, names = ([], set()) if body.get("tools") is None else openai_tools.parse_tools(body["tools"])
    choice = openai_tools.parse_tool_choice(body.get("tool_choice"), names, bool(tools))
    _get(body, "parallel_tool_calls", bool, "a boolean")
    return tuple(tools), choice


def _reject_unsupported(body: dict[str, Any], kind: Kind) -> None:
    if kind == "chat":
        for name in ("audio", "prediction"):
            if body.get(name) is not None:
                raise _bad(name, f"'{name}' is not supported.")
    else:
        if _get(body, "echo", bool, "a boolean"):
            raise _bad("echo", "'echo' is not supported.")
        if body.get("suffix"):
            raise _bad("suffix", "'suffix' is not supported.")
        best_of = _int_in(body, "best_of", 1, UINT32_MAX)
        if best_of is not None and best_of != 1:
            raise _bad("best_of", "Only best_of=1 is supported.")


_SAMPLING_KEYS = frozenset({
    "max_tokens", "max_completion_tokens", "temperature", "top_p", "stop", "seed", "frequency_penalty",
    "presence_penalty", "min_p", "repetition_penalty", "top_k", "response_format", "logprobs", "top_logprobs",
    "adapter",
})
_UNSUPPORTED_KEYS = frozenset({"audio", "prediction", "echo", "suffix", "best_of"})
_TOOL_KEYS = frozenset({"tools", "tool_choice", "functions", "function_call", "parallel_tool_calls"})


def _sampling(body: dict[str, Any], kind: Kind, sampling: runtime_pb2.SamplingParams, names: dict[str, str]
              ) -> None:
    max_tokens = _int_in(body, "max_tokens", 1, UINT32_MAX)
    if kind == "chat":
        newer = _int_in(body, "max_completion_tokens", 1, UINT32_MAX)
        if newer is not None:
            max_tokens, names["max_tokens"] = newer, "max_completion_tokens"
    if max_tokens is not None:
        sampling.max_tokens = max_tokens
    for name in ("temperature", "top_p", "frequency_penalty", "presence_penalty", "min_p", "repetition_penalty"):
        value = _get(body, name, (int, float), "a number")
        if value is not None:
            setattr(sampling, name, value)
    sampling.stop.extend(_stop(body))
    seed = _int_in(body, "seed", INT64_MIN, INT64_MAX)
    if seed is not None:
        sampling.seed = seed
    top_k = _int_in(body, "top_k", 0, UINT32_MAX)
    if top_k is not None:
        sampling.top_k = top_k
    sampling.response_format = _response_format(body)
    _logprobs(body, kind, sampling)
    # Not an OpenAI field: which LoRA adapter of the aimage to apply (the runtime lists what it has loaded).
    adapter = _get(body, "adapter", str, "a string")
    if adapter:
        sampling.adapter = adapter


def parse_request(body: dict[str, Any], kind: Kind) -> OpenAIRequest:
    """Validate a decoded chat or completion request; InvalidArgument names the offending param."""
    model = _model(body)
    messages = _messages(body) if kind == "chat" else ()
    prompt = _prompt(body) if kind == "completion" else ""
    if not _UNSUPPORTED_KEYS.isdisjoint(body):
        _reject_unsupported(body, kind)
    n = _int_in(body, "n", 1, MAX_CHOICES) or 1
    tools: tuple[dict[str, Any], ...] = ()
    tool_choice = None
    if kind == "chat" and not _TOOL_KEYS.isdisjoint(body):
        tools, tool_choice = _tools(body)

    stream = bool(_get(body, "stream", bool, "a boolean"))
    options = _get(body, "stream_options", dict, "an object")
    include_usage = False
    if options is not None:
        if not stream:
            raise _bad("stream_options", "'stream_options' is only allowed when 'stream' is true.")
        include_usage = bool(_get(options, "include_usage", bool, "a boolean", "stream_options.include_usage"))

    sampling = runtime_pb2.SamplingParams()
    names: dict[str, str] = {}
    # Most requests set few of these: look at the ones present only (the request path is hot).
    if not _SAMPLING_KEYS.isdisjoint(body):
        _sampling(body, kind, sampling, names)
        validate_sampling(sampling, names)
    return OpenAIRequest(kind, model, stream, include_usage, sampling, messages, prompt, n, tools, tool_choice)


# -- responses -------------------------------------------------------------------------------------


def finish_reason_name(reason: int) -> str | None:
    return FINISH_REASONS.get(reason)


def usage_dict(usage: runtime_pb2.Usage) -> dict[str, Any]:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.prompt_tokens + usage.completion_tokens,
        # Prompt tokens the runtime found in its KV cache (what prefix-affinity routing is for).
        "prompt_tokens_details": {"cached_tokens": usage.cached_prompt_tokens},
    }


@dataclass
class Choice:
    """One choice of a finished non-streamed request, as collected from its runtime messages."""

    texts: list[str] = field(default_factory=list)
    finish_reason: str | None = None
    logprobs: list[runtime_pb2.TokenLogprob] = field(default_factory=list)
    tool_calls: list[runtime_pb2.ToolCall] = field(default_factory=list)

    @property
    def text(self) -> str:
        return "".join(self.texts)


def _object(kind: Kind, chunk: bool) -> str:
    if kind == "completion":
        return "text_completion"
    return "chat.completion.chunk" if chunk else "chat.completion"


def _chunk(kind: Kind, cid: str, model: str, created: int, choice: dict[str, Any], include_usage: bool
           ) -> dict[str, Any]:
    chunk: dict[str, Any] = {
        "id": cid,
        "object": _object(kind, True),
        "created": created,
        "model": model,
        "system_fingerprint": None,
        "choices": [choice],
    }
    if include_usage:
        # OpenAI sends usage: null on every chunk but the extra last one when usage was asked for.
        chunk["usage"] = None
    return chunk


def chat_chunk(
    cid: str, model: str, created: int, delta: dict[str, Any], finish_reason: str | None, include_usage: bool,
    index: int = 0, logprobs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    return _chunk("chat", cid, model, created,
                  {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason},
                  include_usage)


def completion_chunk(
    cid: str, model: str, created: int, text: str, finish_reason: str | None, include_usage: bool,
    index: int = 0, logprobs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    return _chunk("completion", cid, model, created,
                  {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason},
                  include_usage)


def usage_chunk(kind: Kind, cid: str, model: str, created: int, usage: runtime_pb2.Usage) -> dict[str, Any]:
    return {
        "id": cid,
        "object": _object(kind, True),
        "created": created,
        "model": model,
        "system_fingerprint": None,
        "choices": [],
        "usage": usage_dict(usage),
    }


def _completion(kind: Kind, cid: str, model: str, created: int, choices: list[dict[str, Any]],
                usage: runtime_pb2.Usage) -> dict[str, Any]:
    return {
        "id": cid,
        "object": _object(kind, False),
        "created": created,
        "model": model,
        "system_fingerprint": None,
        "choices": choices,
        "usage": usage_dict(usage),
    }


def chat_completion(cid: str, model: str, created: int, choices: list[Choice], usage: runtime_pb2.Usage,
                    logprobs: bool = False) -> dict[str, Any]:
    out = []
    for i, choice in enumerate(choices):
        message: dict[str, Any] = {"role": "assistant", "content": choice.text, "refusal": None}
        if choice.tool_calls:
            # OpenAI leaves content null when the model only called tools.
            message["content"] = choice.text or None
            message["tool_calls"] = openai_tools.tool_calls_out(choice.tool_calls)
        out.append({
            "index": i,
            "message": message,
            "logprobs": openai_logprobs.chat_logprobs(choice.logprobs) if logprobs else None,
            "finish_reason": choice.finish_reason,
        })
    return _completion("chat", cid, model, created, out, usage)


def text_completion(cid: str, model: str, created: int, choices: list[Choice], usage: runtime_pb2.Usage,
                    logprobs: bool = False) -> dict[str, Any]:
    out = [
        {"index": i, "text": choice.text,
         "logprobs": openai_logprobs.LegacyLogprobs().shape(choice.logprobs) if logprobs else None,
         "finish_reason": choice.finish_reason}
        for i, choice in enumerate(choices)
    ]
    return _completion("completion", cid, model, created, out, usage)


def completion_id(kind: Kind) -> str:
    return ("chatcmpl-" if kind == "chat" else "cmpl-") + request_ids.new_id()


async def collect_completion(parsed: OpenAIRequest, created: int,
                             stream: AsyncIterator[tuple[int, runtime_pb2.GenerateResponse]]) -> dict[str, Any]:
    """A whole (not streamed) chat or text completion from the pipeline's messages, every choice in its place."""
    choices = [Choice() for _ in range(parsed.n)]
    usages: dict[int, runtime_pb2.Usage] = {}
    async for index, message in stream:
        choice = choices[index]
        choice.texts.append(message.text)
        choice.logprobs.extend(message.logprobs)
        if message.finish_reason:
            choice.finish_reason = finish_reason_name(message.finish_reason)
            choice.tool_calls.extend(message.tool_calls)
            usages[index] = message.usage
    build = chat_completion if parsed.kind == "chat" else text_completion
    usage = total_usage([usages[i] for i in sorted(usages)])
    return build(completion_id(parsed.kind), parsed.model, created, choices, usage, parsed.logprobs)


def total_usage(usages: list[runtime_pb2.Usage]) -> runtime_pb2.Usage:
    """n choices of one prompt: the prompt counts once, completions add up (what OpenAI bills)."""
    if len(usages) == 1:
        return usages[0]
    first = usages[0] if usages else runtime_pb2.Usage()
    return runtime_pb2.Usage(prompt_tokens=first.prompt_tokens, cached_prompt_tokens=first.cached_prompt_tokens,
                             completion_tokens=sum(u.completion_tokens for u in usages))


def sse_event(payload: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


# -- errors ----------------------------------------------------------------------------------------


def error_type(status: int) -> str:
    if status == 401:
        return "authentication_error"
    if status == 403:
        return "permission_error"
    if status == 429:
        return "rate_limit_error"
    if status >= 500:
        return "server_error"
    return "invalid_request_error"


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": error_type(status), "param": param, "code": code}}


_RUNTIME_FIELDS = {"chat": "messages", "chat.messages": "messages", "input": "messages", "chat.tools": "tools",
                   "chat.tool_choice": "tool_choice"}


def error_from(err: ClowderError, embeddings: bool = False) -> tuple[int, dict[str, Any]]:
    """HTTP status and OpenAI error body for a domain error (the grpc-gateway status mapping)."""
    status = HTTP_STATUS.get(err.code, 500)
    param = err.violations[0].field if err.violations else None
    if param is not None:
        if embeddings:
            # EmbedRequest.inputs[i] is the client's input[i].
            if param == "inputs" or param.startswith("inputs["):
                param = "input" + param.removeprefix("inputs")
        else:
            # The runtime names fields of its GenerateRequest; the client only knows the flat OpenAI names.
            param = _RUNTIME_FIELDS.get(param, param.removeprefix("sampling."))
    body = error_body(status, err.message, param, err.reason.lower() if err.reason else None)
    if err.reason == "INSUFFICIENT_QUOTA":
        # OpenAI's shape for a used-up budget: its own type, not rate_limit_error (clients treat it as final).
        body["error"]["type"] = "insufficient_quota"
    return status, body
