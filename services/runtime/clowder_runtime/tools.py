"""Tool calling: tool turns as chat-template values, the grammar that forces a call, and the parser of calls."""

from __future__ import annotations

import copy
import json
import logging
import secrets

from llama_cpp.llama_grammar import SchemaConverter

from clowder_runtime.generation import ChatTurn, ToolCall

log = logging.getLogger(__name__)

# The Hermes/Qwen form most GGUF chat templates that support tools teach the model.
OPEN = "<tool_call>"
CLOSE = "</tool_call>"
# tool_choice "required" may still call several tools at once, but not without end.
MAX_FORCED_CALLS = 8
# The exact layout a forced call is written in (the Hermes one).
NAME_KEY = '\n{"name": '
ARGUMENTS_KEY = ', "arguments": '
END = "}\n" + CLOSE


def new_call_id() -> str:
    return "call_" + secrets.token_hex(12)


def template_messages(turns: tuple[ChatTurn, ...]) -> list[dict]:
    """Turns as the dicts chat templates expect (OpenAI's shape; arguments as objects, as HF templates read them)."""
    messages: list[dict] = []
    for turn in turns:
        message: dict = {"role": turn.role, "content": turn.content}
        if turn.tool_calls:
            message["tool_calls"] = [
                {"id": c.id, "type": "function",
                 "function": {"name": c.name, "arguments": _arguments_value(c.arguments)}}
                for c in turn.tool_calls
            ]
        if turn.tool_call_id:
            message["tool_call_id"] = turn.tool_call_id
        if turn.name:
            message["name"] = turn.name
        messages.append(message)
    return messages


def _arguments_value(arguments: str) -> object:
    try:
        value = json.loads(arguments)
    except ValueError:
        return arguments
    return value if isinstance(value, dict) else arguments


def call_grammar(tools: tuple[dict, ...], several: bool) -> str:
    """GBNF for one call (or up to MAX_FORCED_CALLS) to one of `tools`, its arguments following the
    tool's JSON schema (`function.parameters`), so even a small model writes arguments that fit."""
    converter = SchemaConverter(prop_order={}, allow_fetch=False, dotall=False, raw_pattern=False)
    alternatives = []
    for index, tool in enumerate(tools):
        function = tool["function"]
        arguments = _arguments_rule(converter, function.get("parameters"), f"arguments{index}")
        alternatives.append(f'{_literal(json.dumps(function["name"]))} {_literal(ARGUMENTS_KEY)} {arguments}')
    repeat = f' ("\\n" call){{0,{MAX_FORCED_CALLS - 1}}}' if several else ""
    return (
        f"root ::= call{repeat}\n"
        f"call ::= {_literal(OPEN + NAME_KEY)} ( {' | '.join(alternatives)} ) {_literal(END)}\n"
        + converter.format_grammar()
    )


def _arguments_rule(converter: SchemaConverter, schema: object, name: str) -> str:
    """The rule for a tool's arguments; any JSON object when the schema is missing or beyond the converter."""
    if isinstance(schema, dict) and schema.get("type", "object") == "object":
        try:
            return converter.visit(converter.resolve_refs(copy.deepcopy(schema), name), name)
        except Exception:  # noqa: BLE001 - a schema we cannot express still gets a call, with looser arguments
            log.info("tool parameters schema not expressible as a grammar; any JSON object allowed")
    return converter.visit({"type": "object"}, name)


def _literal(text: str) -> str:
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{escaped}"'


def parse_call(body: str) -> ToolCall | None:
    """The JSON between the tags, if it is a call: {"name": str, "arguments": object}."""
    try:
        value = json.loads(body)
    except ValueError:
        return None
    if not isinstance(value, dict) or not isinstance(value.get("name"), str) or not value["name"]:
        return None
    # Some models write "parameters"; an argument object may also arrive already serialized.
    arguments = value.get("arguments", value.get("parameters", {}))
    if isinstance(arguments, str):
        arguments = _arguments_value(arguments)
    if not isinstance(arguments, dict):
        return None
    return ToolCall(new_call_id(), value["name"], json.dumps(arguments, ensure_ascii=False))


class ToolCallParser:
    """Takes streamed text; returns the text that is not part of a call, and collects the calls.

    Text that may be the start of OPEN is held until the next pieces tell.
    Whitespace at the end of the text so far is held too: between and around
    calls it is formatting, not an answer. A block that does not parse as a
    call was text after all and is returned as written.
    """

    def __init__(self) -> None:
        self.calls: list[ToolCall] = []
        self._buffer = ""
        self._in_call = False
        self._space = ""  # trailing whitespace not yet returned
        self._space_before_call = ""

    def feed(self, text: str) -> str:
        out: list[str] = []
        self._buffer += text
        while True:
            if self._in_call:
                end = self._buffer.find(CLOSE)
                if end < 0:
                    break
                body, self._buffer = self._buffer[:end], self._buffer[end + len(CLOSE) :]
                self._in_call = False
                self._end_call(body, CLOSE, out)
                continue
            start = self._buffer.find(OPEN)
            if start >= 0:
                self._text(self._buffer[:start], out)
                self._buffer = self._buffer[start + len(OPEN) :]
                self._in_call = True
                self._space_before_call, self._space = self._space, ""
                continue
            keep = _partial_open(self._buffer)
            self._text(self._buffer[: len(self._buffer) - keep], out)
            self._buffer = self._buffer[len(self._buffer) - keep :]
            break
        return "".join(out)

    def finish(self) -> str:
        """The end of the output: what is still held is text, unless it is a call missing its closing tag."""
        out: list[str] = []
        if self._in_call:
            self._in_call = False
            self._end_call(self._buffer, "", out)
        else:
            self._text(self._buffer, out)
        self._buffer = ""
        if not self.calls:
            out.append(self._space)
        self._space = ""
        return "".join(out)

    def _end_call(self, body: str, close: str, out: list[str]) -> None:
        call = parse_call(body)
        if call is not None:
            self.calls.append(call)
        else:
            self._text(self._space_before_call + OPEN + body + close, out)
        self._space_before_call = ""

    def _text(self, text: str, out: list[str]) -> None:
        if not text:
            return
        text = self._space + text
        kept = text.rstrip()
        self._space = text[len(kept) :]
        if kept:
            out.append(kept)


def _partial_open(text: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of OPEN."""
    for size in range(min(len(text), len(OPEN) - 1), 0, -1):
        if OPEN.startswith(text[-size:]):
            return size
    return 0
