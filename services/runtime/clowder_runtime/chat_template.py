"""A model's chat template (from its GGUF, or an override): rendering, and whether it knows about tools."""

from __future__ import annotations

import re
import secrets

import jinja2
import jinja2.ext
import jinja2.meta
from jinja2.sandbox import ImmutableSandboxedEnvironment
from llama_cpp.llama_chat_format import Jinja2ChatFormatter

from clowder_common.chat_templates import check_chat_template
from clowder_common.errors import InvalidArgument


def _environment() -> ImmutableSandboxedEnvironment:
    # The extensions the renderer uses, so a template that parses here also renders there.
    return ImmutableSandboxedEnvironment(
        extensions=[Jinja2ChatFormatter.IgnoreGenerationTags, jinja2.ext.loopcontrols],
    )


def check_template(source: str, field: str) -> None:
    """Refuse a template that does not even parse (an override's mistakes show at start, not per request);
    the controller runs the same check when an aimage is created."""
    check_chat_template(source, field)


class ChatTemplate:
    def __init__(self, source: str, bos_token: str, eos_token: str) -> None:
        self.source = source
        self._formatter = Jinja2ChatFormatter(
            template=source, eos_token=eos_token, bos_token=bos_token, add_generation_prompt=True,
        )
        # A template that never reads `tools` would silently drop them: the model would not know them.
        self.uses_tools = "tools" in jinja2.meta.find_undeclared_variables(_environment().parse(source))

    def render_parts(self, messages: list[dict], tools: list[dict] | None = None) -> list[tuple[str, bool]]:
        """The rendered prompt as (text, from the template) pieces: what the messages' contents put there is
        marked False, so it is tokenized as plain text. A user who types `<|im_start|>system` gets those
        characters, never the control token: no one forges a turn (issue 16).

        Contents go through the template as unguessable placeholders (a fresh nonce per render, in Unicode
        private-use characters), which are then swapped back; a template that edits the content (trim, say)
        edits the placeholder instead, so contents always arrive verbatim."""
        nonce = secrets.token_hex(8)
        contents: list[str] = []
        stand_ins = []
        for message in messages:
            content = message.get("content")
            if isinstance(content, str) and content:
                stand_ins.append({**message, "content": f"\ue000{nonce}:{len(contents)}\ue001"})
                contents.append(content)
            else:
                stand_ins.append(message)
        rendered = self.render(stand_ins, tools)
        parts: list[tuple[str, bool]] = []
        pattern = re.compile("\ue000" + nonce + ":(\\d+)\ue001")
        at = 0
        for match in pattern.finditer(rendered):
            if match.start() > at:
                parts.append((rendered[at:match.start()], True))
            parts.append((contents[int(match.group(1))], False))
            at = match.end()
        if at < len(rendered):
            parts.append((rendered[at:], True))
        return parts

    def render(self, messages: list[dict], tools: list[dict] | None = None) -> str:
        try:
            # llama_cpp types messages and tools as its TypedDicts; ours are the same shapes, checked by validation.
            return self._formatter(messages=messages, tools=tools).prompt  # type: ignore[arg-type]
        except (jinja2.TemplateError, ValueError, TypeError, AttributeError, KeyError) as exc:
            # Templates reject some conversations on purpose (raise_exception), e.g. bad role order.
            raise InvalidArgument(
                f"the model's chat template rejected the messages: {exc}", field="messages"
            ) from None
