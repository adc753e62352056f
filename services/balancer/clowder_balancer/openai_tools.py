"""OpenAI tool calling on the wire: tool definitions, tool_choice, tool-call history in messages, calls out."""

from __future__ import annotations

import json
import re
from typing import Any, Iterable, Sequence

from google.protobuf import struct_pb2

from clowder.runtime.v1 import runtime_pb2
from clowder_common.errors import InvalidArgument
from clowder_common.limits import MAX_TOOLS

# OpenAI's rule: function names are identifiers of at most 64 characters.
FUNCTION_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")

_MODES = {
    "none": runtime_pb2.ToolChoice.MODE_NONE,
    "auto": runtime_pb2.ToolChoice.MODE_AUTO,
    "required": runtime_pb2.ToolChoice.MODE_REQUIRED,
}
_MODE_NAMES = {mode: name for name, mode in _MODES.items()}


def _bad(param: str, message: str) -> InvalidArgument:
    return InvalidArgument(message, field=param)


def to_struct(value: dict[str, Any]) -> struct_pb2.Struct:
    out = struct_pb2.Struct()
    out.update(value)
    return out


def parse_tools(value: Any) -> tuple[list[dict[str, Any]], set[str]]:
    """The request's `tools`, checked as OpenAI checks them, and the function names they define."""
    if not isinstance(value, list):
        raise _bad("tools", "Invalid type for 'tools': expected an array of tool objects.")
    if len(value) > MAX_TOOLS:
        raise _bad("tools", f"Invalid 'tools': at most {MAX_TOOLS} tools are allowed.")
    names: set[str] = set()
    for i, tool in enumerate(value):
        param = f"tools[{i}]"
        if not isinstance(tool, dict):
            raise _bad(param, f"Invalid type for '{param}': expected an object.")
        if tool.get("type") != "function":
            raise _bad(f"{param}.type", f"Invalid '{param}.type': only 'function' tools are supported.")
        function = tool.get("function")
        if not isinstance(function, dict):
            raise _bad(f"{param}.function", f"Missing required parameter: '{param}.function'.")
        name = function.get("name")
        if not isinstance(name, str) or not FUNCTION_NAME.match(name):
            raise _bad(f"{param}.function.name", f"Invalid '{param}.function.name': expected a string of letters, "
                       "digits, underscores and dashes, at most 64 characters.")
        if "description" in function and not isinstance(function["description"], (str, type(None))):
            raise _bad(f"{param}.function.description", f"Invalid type for '{param}.function.description'.")
        if "parameters" in function and not isinstance(function["parameters"], (dict, type(None))):
            raise _bad(f"{param}.function.parameters",
                       f"Invalid type for '{param}.function.parameters': expected a JSON schema object.")
        names.add(name)
    return value, names


def parse_tool_choice(value: Any, names: set[str], have_tools: bool) -> runtime_pb2.ToolChoice | None:
    if value is None:
        return None
    if not have_tools:
        # OpenAI's own rule: a choice among no tools means nothing.
        raise _bad("tool_choice", "Invalid value for 'tool_choice': 'tool_choice' is only allowed when 'tools' "
                   "are specified.")
    if isinstance(value, str):
        if value not in _MODES:
            raise _bad("tool_choice", "Invalid value for 'tool_choice': expected 'none', 'auto', 'required' or "
                       "an object naming a function.")
        return runtime_pb2.ToolChoice(mode=_MODES[value])
    if isinstance(value, dict) and value.get("type") == "function" and isinstance(value.get("function"), dict):
        name = value["function"].get("name")
        if not isinstance(name, str) or name not in names:
            raise _bad("tool_choice", f"Invalid value for 'tool_choice': no function named {name!r} in 'tools'.")
        return runtime_pb2.ToolChoice(mode=runtime_pb2.ToolChoice.MODE_FUNCTION, function_name=name)
    raise _bad("tool_choice", "Invalid value for 'tool_choice': expected 'none', 'auto', 'required' or "
               "{\"type\": \"function\", \"function\": {\"name\": ...}}.")


def tool_choice_value(choice: runtime_pb2.ToolChoice) -> Any:
    """The OpenAI form of a ToolChoice (for logs and round trips)."""
    if choice.mode == runtime_pb2.ToolChoice.MODE_FUNCTION:
        return {"type": "function", "function": {"name": choice.function_name}}
    return _MODE_NAMES.get(choice.mode, "auto")


def parse_message_tool_calls(value: Any, param: str) -> list[runtime_pb2.ToolCall]:
    """An assistant message's `tool_calls` (history of a tool-using conversation)."""
    if not isinstance(value, list):
        raise _bad(param, f"Invalid type for '{param}': expected an array.")
    calls = []
    for j, call in enumerate(value):
        where = f"{param}[{j}]"
        if not isinstance(call, dict) or call.get("type", "function") != "function":
            raise _bad(where, f"Invalid '{where}': expected a function call object.")
        function = call.get("function")
        call_id = call.get("id")
        if not isinstance(call_id, str) or not call_id:
            raise _bad(f"{where}.id", f"Missing required parameter: '{where}.id'.")
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise _bad(f"{where}.function", f"Invalid '{where}.function': expected {{name, arguments}}.")
        arguments = function.get("arguments", "")
        if isinstance(arguments, dict):
            arguments = json.dumps(arguments)  # lenient: some clients send the object itself
        if not isinstance(arguments, str):
            raise _bad(f"{where}.function.arguments", f"Invalid type for '{where}.function.arguments': "
                       "expected a string.")
        calls.append(runtime_pb2.ToolCall(id=call_id, name=function["name"], arguments=arguments))
    return calls


def name_tool_messages(messages: Sequence[runtime_pb2.ChatMessage]) -> None:
    """Give each tool message the name of the function whose call it answers (some templates print it)."""
    names: dict[str, str] = {}
    for message in messages:
        for call in message.tool_calls:
            names[call.id] = call.name
        if message.role == "tool" and not message.name:
            message.name = names.get(message.tool_call_id, "")


def tool_calls_out(calls: Iterable[runtime_pb2.ToolCall], with_index: bool = False) -> list[dict[str, Any]]:
    """OpenAI's message.tool_calls (or, with_index, a stream delta's tool_calls)."""
    out = []
    for k, call in enumerate(calls):
        item: dict[str, Any] = {"id": call.id, "type": "function",
                                "function": {"name": call.name, "arguments": call.arguments}}
        if with_index:
            item = {"index": k, **item}
        out.append(item)
    return out
