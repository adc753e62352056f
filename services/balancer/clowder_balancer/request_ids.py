"""Request ids: taken from the client when sane, made up otherwise, carried to the runtime and into logs."""

from __future__ import annotations

import re
import uuid

HEADER = "x-request-id"

# Client ids end up in our logs and the runtime's: accept plain tokens only, replace the rest.
_VALID = re.compile(r"^[A-Za-z0-9._:@/+=-]{1,128}$")


def request_id(given: str | bytes | None) -> str:
    if isinstance(given, bytes):
        given = given.decode(errors="replace")
    return given if given and _VALID.match(given) else uuid.uuid4().hex
