"""google.api.http path templates: parse, match a request path, list the variables."""

from __future__ import annotations

import re
import urllib.parse
from dataclasses import dataclass

_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")


class TemplateError(ValueError):
    """A google.api.http path template that does not follow the grammar."""


@dataclass(frozen=True)
class Variable:
    # Dotted field path in the request message, e.g. "deployment.name".
    field_path: str
    # True when the variable may hold several segments ("**"), so "/" in a value is kept.
    multi_segment: bool


@dataclass(frozen=True)
class PathTemplate:
    """A compiled template: `match(path)` gives {field path: value} or None."""

    text: str
    variables: tuple[Variable, ...]
    verb: str
    literal_segments: int
    _regex: re.Pattern

    def match(self, raw_path: str) -> dict[str, str] | None:
        found = self._regex.fullmatch(raw_path)
        if found is None:
            return None
        values = {}
        for index, variable in enumerate(self.variables):
            raw = found.group(f"v{index}")
            # Single-segment values decode fully; multi-segment ones keep an encoded "/" as "%2F" (as grpc-gateway).
            values[variable.field_path] = (urllib.parse.unquote(raw.replace("%2F", "%252F").replace("%2f", "%252f"))
                                           if variable.multi_segment else urllib.parse.unquote(raw))
        return values

    def openapi_path(self) -> str:
        """The template with each variable as `{field.path}`, the form OpenAPI paths use."""
        out, depth, start = [], 0, 0
        for index, char in enumerate(self.text):
            if char == "{":
                if depth == 0:
                    out.append(self.text[start:index])
                    start = index
                depth += 1
            elif char == "}":
                depth -= 1
                if depth == 0:
                    name = self.text[start + 1:index].split("=", 1)[0]
                    out.append("{" + name + "}")
                    start = index + 1
        out.append(self.text[start:])
        return "".join(out)


def parse_template(text: str) -> PathTemplate:
    if not text.startswith("/"):
        raise TemplateError(f"path template {text!r} must start with '/'")
    body, verb = _split_verb(text)
    variables: list[Variable] = []
    literal_count = [0]
    pattern = "/" + _segments(body[1:], variables, literal_count, text, inside=False)
    if verb:
        pattern += re.escape(":" + verb)
    return PathTemplate(text, tuple(variables), verb, literal_count[0], re.compile(pattern))


def _split_verb(text: str) -> tuple[str, str]:
    """The verb is a ':' after the last '/' and outside any '{...}'."""
    depth = 0
    last_slash = -1
    colon = -1
    for index, char in enumerate(text):
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
        elif depth == 0 and char == "/":
            last_slash, colon = index, -1
        elif depth == 0 and char == ":" and index > last_slash:
            colon = index
    if colon < 0:
        return text, ""
    verb = text[colon + 1:]
    if not verb or "/" in verb:
        raise TemplateError(f"path template {text!r} has an empty verb")
    return text[:colon], verb


def _split_segments(text: str, whole: str) -> list[str]:
    parts, depth, start = [], 0, 0
    for index, char in enumerate(text):
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth < 0:
                raise TemplateError(f"unbalanced '}}' in path template {whole!r}")
        elif char == "/" and depth == 0:
            parts.append(text[start:index])
            start = index + 1
    if depth != 0:
        raise TemplateError(f"unbalanced '{{' in path template {whole!r}")
    parts.append(text[start:])
    return parts


def _segments(text: str, variables: list[Variable], literal_count: list[int], whole: str, inside: bool) -> str:
    out = []
    parts = _split_segments(text, whole)
    for position, segment in enumerate(parts):
        if segment == "":
            raise TemplateError(f"empty segment in path template {whole!r}")
        if segment == "*":
            out.append(r"[^/]+")
        elif segment == "**":
            if position != len(parts) - 1:
                raise TemplateError(f"'**' must be the last segment in path template {whole!r}")
            out.append(r".+")
        elif segment.startswith("{"):
            if inside:
                raise TemplateError(f"nested variable in path template {whole!r}")
            if not segment.endswith("}"):
                raise TemplateError(f"bad variable {segment!r} in path template {whole!r}")
            name, _, sub = segment[1:-1].partition("=")
            if not _IDENT.fullmatch(name):
                raise TemplateError(f"bad field path {name!r} in path template {whole!r}")
            index = len(variables)
            sub = sub or "*"
            variables.append(Variable(name, "**" in sub.split("/") or "/" in sub))
            inner = _segments(sub, variables, literal_count, whole, inside=True)
            out.append(f"(?P<v{index}>{inner})")
        else:
            if any(c in segment for c in "{}*"):
                raise TemplateError(f"bad segment {segment!r} in path template {whole!r}")
            literal_count[0] += 1
            out.append(re.escape(urllib.parse.quote(segment, safe="-._~!$&'()*+,;=:@")))
    return "/".join(out)
