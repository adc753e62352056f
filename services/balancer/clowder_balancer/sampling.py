"""Sampling parameter limits, checked the same way for the HTTP and gRPC faces."""

from __future__ import annotations

import math
from typing import Mapping

from clowder.runtime.v1 import runtime_pb2
from clowder_common.errors import InvalidArgument

TEMPERATURE_MAX = 2.0
TOP_P_MAX = 1.0
MAX_STOP_SEQUENCES = 4
UINT32_MAX = 2**32 - 1
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
_RESPONSE_FORMATS = frozenset(runtime_pb2.ResponseFormat.values())


def validate_sampling(params: runtime_pb2.SamplingParams, names: Mapping[str, str] | None = None) -> None:
    """Raise InvalidArgument naming the first bad field; `names` maps proto field names to the caller's."""

    def name(field: str) -> str:
        return (names or {}).get(field, field)

    if params.HasField("temperature"):
        if not math.isfinite(params.temperature) or not 0.0 <= params.temperature <= TEMPERATURE_MAX:
            raise InvalidArgument(
                f"{name('temperature')} must be between 0 and {TEMPERATURE_MAX:g}", field=name("temperature")
            )
    if params.HasField("top_p"):
        # 0 would leave no token to sample from; the runtime refuses it too.
        if not math.isfinite(params.top_p) or not 0.0 < params.top_p <= TOP_P_MAX:
            raise InvalidArgument(f"{name('top_p')} must be in (0, {TOP_P_MAX:g}]", field=name("top_p"))
    for field, low, high in (("frequency_penalty", -2.0, 2.0), ("presence_penalty", -2.0, 2.0),
                             ("min_p", 0.0, 1.0), ("repetition_penalty", 0.01, 10.0)):
        if params.HasField(field):
            value = getattr(params, field)
            if not math.isfinite(value) or not low <= value <= high:
                raise InvalidArgument(f"{name(field)} must be between {low:g} and {high:g}", field=name(field))
    if params.response_format not in _RESPONSE_FORMATS:
        raise InvalidArgument(f"{name('response_format')} is not a known format", field=name("response_format"))
    if params.HasField("max_tokens") and params.max_tokens < 1:
        raise InvalidArgument(f"{name('max_tokens')} must be at least 1", field=name("max_tokens"))
    if len(params.stop) > MAX_STOP_SEQUENCES:
        raise InvalidArgument(
            f"{name('stop')} takes at most {MAX_STOP_SEQUENCES} sequences", field=name("stop")
        )
    if any(s == "" for s in params.stop):
        raise InvalidArgument(f"{name('stop')} sequences must not be empty", field=name("stop"))
