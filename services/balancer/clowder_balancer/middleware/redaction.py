"""Secrets out of anything written down: bearer tokens, Clowder and OpenAI-style keys, passwords in URLs."""

from __future__ import annotations

import re
from typing import Any

_SECRET = re.compile(
    r"(?i)(bearer\s+)[A-Za-z0-9._~+/=-]+"
    r"|ck-[0-9a-f]{12}-[A-Za-z0-9_-]{43}"
    r"|\bsk-[A-Za-z0-9_-]{16,}"
    r"|(://[^/\s:@]+:)[^@\s/]+(@)"
)


def _replace(match: re.Match[str]) -> str:
    if match.group(1):
        return match.group(1) + "[REDACTED]"
    if match.group(2):
        return match.group(2) + "[REDACTED]" + match.group(3)
    return "[REDACTED]"


def redact(value: Any) -> Any:
    """The same structure with every secret-looking string part replaced."""
    if isinstance(value, str):
        return _SECRET.sub(_replace, value)
    if isinstance(value, dict):
        return {k: redact(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact(v) for v in value]
    return value
