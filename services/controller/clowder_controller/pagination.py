"""Page tokens for list RPCs: an opaque cursor holding the last key returned."""

from __future__ import annotations

import base64
from typing import Sequence, TypeVar

from clowder_common.errors import InvalidArgument

T = TypeVar("T")

DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000


def _encode(name: str) -> str:
    return base64.urlsafe_b64encode(name.encode()).decode()


def _decode(token: str) -> str:
    try:
        return base64.urlsafe_b64decode(token.encode()).decode()
    except Exception:
        raise InvalidArgument("page_token is not one this server issued", field="page_token") from None


def paginate(items: Sequence[tuple[str, T]], page_size: int, page_token: str) -> tuple[list[T], str]:
    """`items` are (name, value) sorted by name; returns one page and the next token ("" at the end)."""
    size = page_size or DEFAULT_PAGE_SIZE
    if size > MAX_PAGE_SIZE:
        raise InvalidArgument(f"page_size must be at most {MAX_PAGE_SIZE}", field="page_size")
    after = _decode(page_token) if page_token else None
    remaining = [(name, value) for name, value in items if after is None or name > after]
    page = remaining[:size]
    next_token = _encode(page[-1][0]) if len(remaining) > size else ""
    return [value for _, value in page], next_token
