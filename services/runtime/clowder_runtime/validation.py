"""Turn a GenerateRequest plus the image's defaults into a GenerationJob, or say precisely what is wrong."""

from __future__ import annotations

import re

from clowder.controller.v1 import resources_pb2
from clowder.runtime.v1 import runtime_pb2
from google.protobuf import json_format

from clowder_common.errors import FieldViolation, InvalidArgument
from clowder_common.limits import MAX_EMBED_INPUTS, MAX_TOOLS, SAMPLING_RANGES, sampling_violations
from clowder_runtime.chat_template import check_template
from clowder_runtime.generation import (
    ChatTurn, GenerationJob, Priority, SamplingSettings, ToolCall, ToolChoice, ToolMode,
)

ROLES = ("system", "user", "assistant", "tool")
# OpenAI's rule for function names; it also keeps them safe inside a GBNF literal.
FUNCTION_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
_TOOL_MODES = {
    runtime_pb2.ToolChoice.MODE_UNSPECIFIED: ToolMode.AUTO,
    runtime_pb2.ToolChoice.MODE_AUTO: ToolMode.AUTO,
    runtime_pb2.ToolChoice.MODE_NONE: ToolMode.NONE,
    runtime_pb2.ToolChoice.MODE_REQUIRED: ToolMode.REQUIRED,
    runtime_pb2.ToolChoice.MODE_FUNCTION: ToolMode.FUNCTION,
}
_PRIORITIES = {
    runtime_pb2.PRIORITY_UNSPECIFIED: Priority.INTERACTIVE,
    runtime_pb2.PRIORITY_INTERACTIVE: Priority.INTERACTIVE,
    runtime_pb2.PRIORITY_BATCH: Priority.BATCH,
}
# Limits (stop strings, ranges, tools, embedding inputs) are clowder_common.limits, shared with the balancer.
# llama.cpp's own defaults, used when neither the request nor the image sets a value.
DEFAULT_TEMPERATURE = 0.8
DEFAULT_TOP_P = 0.95
DEFAULT_TOP_K = 40
DEFAULT_MAX_TOKENS = 256
DEFAULT_MIN_P = 0.05
DEFAULT_PENALTIES = {"repetition_penalty": 1.0, "frequency_penalty": 0.0, "presence_penalty": 0.0}

# Field names follow the OpenAI request parameters, so the balancer can relay them as `param`.


def validate_image_config(image: resources_pb2.ImageConfiguration) -> None:
    """An aimage's defaults must be valid on their own, or every request would fail."""
    violations: list[FieldViolation] = []
    for name in ("temperature", "top_p"):
        value = getattr(image, name)
        if image.HasField(name) and not SAMPLING_RANGES[name].contains(value):
            violations.append(FieldViolation(f"image_config.{name}", f"{name} {SAMPLING_RANGES[name].problem(value)}"))
    if image.HasField("max_tokens") and image.max_tokens == 0:
        violations.append(FieldViolation("image_config.max_tokens", "max_tokens must be at least 1"))
    _raise_if_any(violations)
    if image.chat_template:
        check_template(image.chat_template, "image_config.chat_template")


def build_job(request: runtime_pb2.GenerateRequest, image: resources_pb2.ImageConfiguration) -> GenerationJob:
    """Validate everything that does not need the model (token counts are the engine's)."""
    violations: list[FieldViolation] = []
    messages: tuple[ChatTurn, ...] | None = None
    prompt: str | None = None
    kind = request.WhichOneof("input")
    if kind == "chat":
        turns = list(request.chat.messages)
        if not turns:
            violations.append(FieldViolation("messages", "chat needs at least one message"))
        for index, turn in enumerate(turns):
            if turn.role not in ROLES:
                violations.append(
                    FieldViolation(
                        f"messages[{index}].role",
                        f"unknown role {turn.role[:40]!r}; use one of {', '.join(ROLES)}",
                    )
                )
            if turn.tool_calls and turn.role != "assistant":
                violations.append(
                    FieldViolation(f"messages[{index}].tool_calls", "only assistant messages make tool calls")
                )
        messages = tuple(
            ChatTurn(
                t.role, t.content,
                tool_calls=tuple(ToolCall(c.id, c.name, c.arguments) for c in t.tool_calls),
                tool_call_id=t.tool_call_id, name=t.name,
            )
            for t in turns
        )
        tools, tool_choice = _tools(request.chat, violations)
        assistant_prefix = request.chat.assistant_prefix
        if image.system_prompt and not any(t.role == "system" for t in messages):
            messages = (ChatTurn("system", image.system_prompt), *messages)
    elif kind == "prompt":
        if not request.prompt:
            violations.append(FieldViolation("prompt", "prompt must not be empty"))
        prompt = request.prompt
    else:
        violations.append(FieldViolation("input", "set either chat.messages or prompt"))
    if kind != "chat":
        tools, tool_choice, assistant_prefix = (), ToolChoice(), ""

    sampling = request.sampling
    # The limits every service checks (clowder_common.limits): ranges, stop strings, max_tokens, top_logprobs.
    violations += [FieldViolation(v.path(v.field), v.message(v.field)) for v in sampling_violations(sampling)]
    # The request's value, else the image's default, else llama.cpp's.
    temperature = _setting(sampling, image, "temperature", DEFAULT_TEMPERATURE)
    top_p = _setting(sampling, image, "top_p", DEFAULT_TOP_P)
    top_k = sampling.top_k if sampling.HasField("top_k") else DEFAULT_TOP_K
    max_tokens = image.max_tokens if image.HasField("max_tokens") and image.max_tokens else DEFAULT_MAX_TOKENS
    if sampling.HasField("max_tokens"):
        max_tokens = sampling.max_tokens
    stops = tuple(sampling.stop)
    min_p = sampling.min_p if sampling.HasField("min_p") else DEFAULT_MIN_P
    penalties = {name: getattr(sampling, name) if sampling.HasField(name) else default
                 for name, default in DEFAULT_PENALTIES.items()}
    if kind == "chat" and tool_choice.mode in (ToolMode.REQUIRED, ToolMode.FUNCTION) and (
        sampling.response_format == runtime_pb2.RESPONSE_FORMAT_JSON_OBJECT
    ):
        violations.append(
            FieldViolation("response_format", "response_format cannot be combined with a forced tool call")
        )
    if kind == "chat" and assistant_prefix and (
        tool_choice.mode in (ToolMode.REQUIRED, ToolMode.FUNCTION)
        or sampling.response_format == runtime_pb2.RESPONSE_FORMAT_JSON_OBJECT
    ):
        # A grammar starts at the answer's first character: it would not accept the prefix's continuation.
        violations.append(FieldViolation(
            "assistant_prefix", "assistant_prefix cannot be combined with response_format or a forced tool call"))
    priority = _PRIORITIES.get(request.priority)
    if priority is None:
        violations.append(FieldViolation("priority", f"unknown priority {request.priority}"))
    _raise_if_any(violations)
    return GenerationJob(
        request_id=request.request_id,
        sampling=SamplingSettings(
            temperature=float(temperature),
            top_p=float(top_p),
            top_k=int(top_k),
            max_tokens=int(max_tokens),
            stop=stops,
            seed=sampling.seed if sampling.HasField("seed") else None,
            min_p=float(min_p),
            repetition_penalty=float(penalties["repetition_penalty"]),
            frequency_penalty=float(penalties["frequency_penalty"]),
            presence_penalty=float(penalties["presence_penalty"]),
            json=sampling.response_format == runtime_pb2.RESPONSE_FORMAT_JSON_OBJECT,
            logprobs=sampling.logprobs,
            top_logprobs=int(sampling.top_logprobs),
        ),
        messages=messages,
        prompt=prompt,
        # Whether it names a loaded adapter is the engine's to say.
        adapter=sampling.adapter,
        tools=tools,
        tool_choice=tool_choice,
        assistant_prefix=assistant_prefix,
        priority=Priority.INTERACTIVE if priority is None else priority,
    )


def _setting(sampling: runtime_pb2.SamplingParams, image: resources_pb2.ImageConfiguration, name: str,
             default: float) -> float:
    if sampling.HasField(name):
        return float(getattr(sampling, name))
    return float(getattr(image, name)) if image.HasField(name) else default


def _tools(chat: runtime_pb2.ChatInput, violations: list[FieldViolation]) -> tuple[tuple[dict, ...], ToolChoice]:
    """Tool definitions as plain JSON values, and the tool choice; whether the template takes them is the engine's."""
    if len(chat.tools) > MAX_TOOLS:
        violations.append(FieldViolation("tools", f"at most {MAX_TOOLS} tools, got {len(chat.tools)}"))
    tools: list[dict] = []
    for index, struct in enumerate(chat.tools):
        tool = json_format.MessageToDict(struct)
        function = tool.get("function")
        if tool.get("type", "function") != "function":
            violations.append(FieldViolation(f"tools[{index}].type", "only tools of type \"function\" exist"))
        elif not isinstance(function, dict):
            violations.append(FieldViolation(f"tools[{index}].function", "a tool needs a function object"))
        elif not isinstance(function.get("name"), str) or not FUNCTION_NAME.fullmatch(function["name"]):
            violations.append(FieldViolation(
                f"tools[{index}].function.name", "function names are 1 to 64 letters, digits, '_' or '-'"))
        else:
            tool.setdefault("type", "function")
            tools.append(tool)
    choice = chat.tool_choice
    mode = _TOOL_MODES.get(choice.mode)
    names = [t["function"]["name"] for t in tools]
    if mode is None:
        violations.append(FieldViolation("tool_choice", f"unknown tool_choice mode {choice.mode}"))
        mode = ToolMode.AUTO
    elif mode in (ToolMode.REQUIRED, ToolMode.FUNCTION) and not chat.tools:
        violations.append(FieldViolation("tool_choice", f"tool_choice {mode.value} needs tools"))
    elif mode is ToolMode.FUNCTION and chat.tools and choice.function_name not in names:
        violations.append(FieldViolation(
            "tool_choice", f"tool_choice names function {choice.function_name[:64]!r}, which is not among the tools"))
    return tuple(tools), ToolChoice(mode, choice.function_name if mode is ToolMode.FUNCTION else "")


def embed_inputs(request: runtime_pb2.EmbedRequest) -> list[str]:
    """The texts to embed; whether each fits the context is the engine's to say."""
    violations: list[FieldViolation] = []
    if not request.inputs:
        violations.append(FieldViolation("inputs", "give at least one input"))
    elif len(request.inputs) > MAX_EMBED_INPUTS:
        violations.append(
            FieldViolation("inputs", f"at most {MAX_EMBED_INPUTS} inputs per call, got {len(request.inputs)}")
        )
    for index, text in enumerate(request.inputs):
        if not text:
            violations.append(FieldViolation(f"inputs[{index}]", "inputs must not be empty"))
    _raise_if_any(violations)
    return list(request.inputs)


def _raise_if_any(violations: list[FieldViolation]) -> None:
    if violations:
        raise InvalidArgument("; ".join(v.description for v in violations), violations=violations)
