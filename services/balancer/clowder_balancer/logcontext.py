"""The current request's id in a context variable, and a log filter that puts it on every line logged for it."""

from __future__ import annotations

import contextvars
import logging

REQUEST_ID: contextvars.ContextVar[str] = contextvars.ContextVar("clowder_request_id", default="")
# The replica that served the current request (last attempt), for its one access-log line.
REPLICA: contextvars.ContextVar[str] = contextvars.ContextVar("clowder_replica", default="")


class RequestIdFilter(logging.Filter):
    """Prefixes `request_id=<id>` to records logged while a request is handled (unless the message has it).

    Library records (grpc, aiohttp, aetcd) logged on a request's behalf get it too, which a per-call
    argument never could.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        rid = REQUEST_ID.get()
        record.request_id = rid
        if rid and isinstance(record.msg, str) and "request_id=" not in record.msg:
            record.msg = f"request_id={rid} {record.msg}"
        return True


def install() -> None:
    """Add the filter to the root handlers (call once in main(), after setup_logging)."""
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, RequestIdFilter) for f in handler.filters):
            handler.addFilter(RequestIdFilter())
