"""Logging setup: one line per record, key=value fields, secrets never printed."""

from __future__ import annotations

import logging
import os
import re
import sys

# Bearer tokens and key-like query values are masked in case one reaches a message.
_SECRET_RE = re.compile(r"(?i)(bearer\s+|token=|api[_-]?key=|password=|secret=)[^\s&\"']+")


class RedactingFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return _SECRET_RE.sub(r"\1[redacted]", super().format(record))


def setup_logging(service: str, level: str | None = None) -> None:
    """Configure the root logger once, in main(); never at import time."""
    level = (level or os.environ.get("CLOWDER_LOG_LEVEL") or "INFO").upper()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        RedactingFormatter(f"%(asctime)s %(levelname)s service={service} logger=%(name)s %(message)s")
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # grpc and aetcd are chatty at INFO about reconnects we already report.
    logging.getLogger("aetcd").setLevel(max(logging.WARNING, root.level))
