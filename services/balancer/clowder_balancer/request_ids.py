"""Request ids: taken from the client when sane, made up otherwise, carried to the runtime and into logs."""

from __future__ import annotations

import os
import re

HEADER = "x-request-id"

# Client ids end up in our logs and the runtime's: accept plain tokens only, replace the rest.
_VALID = re.compile(r"^[A-Za-z0-9._:@/+=-]{1,128}$")


def request_id(given: str | bytes | None) -> str:
    if isinstance(given, bytes):
        given = given.decode(errors="replace")
    return given if given and _VALID.match(given) else new_id()


def new_id() -> str:
    """32 random hex digits, as uuid4().hex gives, for less (one per request, and one per completion)."""
    return os.urandom(16).hex()
