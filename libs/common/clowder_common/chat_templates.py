"""Checks on a Jinja chat template given as configuration, so a broken one is refused when it is set, not per request."""

from __future__ import annotations

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

from clowder_common.errors import InvalidArgument

# Chat templates are a few KiB; anything much larger is a mistake (or an attempt to bloat etcd).
MAX_TEMPLATE_BYTES = 64 * 1024


class _GenerationTags(jinja2.ext.Extension):
    """Hugging Face templates may mark the assistant's part with {% generation %}...{% endgeneration %};
    renderers ignore the markers, so the check must accept them."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.Scope(body, lineno=lineno)


def check_chat_template(source: str, field: str) -> None:
    """InvalidArgument naming `field` when the template is too large or does not parse."""
    if len(source.encode("utf-8")) > MAX_TEMPLATE_BYTES:
        raise InvalidArgument(f"the chat template is larger than {MAX_TEMPLATE_BYTES} bytes", field=field)
    environment = ImmutableSandboxedEnvironment(extensions=[_GenerationTags, jinja2.ext.loopcontrols])
    try:
        environment.parse(source)
    except jinja2.TemplateSyntaxError as exc:
        raise InvalidArgument(f"the chat template does not parse: {exc} (line {exc.lineno})", field=field) from None
