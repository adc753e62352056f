"""Request limits: the one set of bounds that the balancer (its OpenAI HTTP face and its gRPC face) and the runtime
check requests against, and the one check of a SamplingParams message that both run.

The balancer checks first, so a client learns of a bad value before its request is queued or routed, in the
caller's field names; the runtime checks again because its gRPC API is a contract of its own (the batch worker,
tests and any direct caller use it). Both use the numbers and the check below, so they cannot disagree.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass

from clowder.runtime.v1 import runtime_pb2

# Stop strings per request: OpenAI's limit. Each is searched for after every token, so the work stays small.
MAX_STOP_STRINGS = 4
MAX_STOP_CHARS = 256
# Most likely alternatives per position: OpenAI's bound on chat top_logprobs (the runtime's contract, 0 to 20).
MAX_TOP_LOGPROBS = 20
# Legacy completions' `logprobs` (a count there): OpenAI's bound.
MAX_COMPLETION_LOGPROBS = 5
# Choices per request (`n`): each is a generation of its own on the runtime, so keep it modest.
MAX_CHOICES = 16
# Tool definitions per chat request.
MAX_TOOLS = 128
# Texts per EmbedRequest to one runtime; the balancer splits a larger request into calls of this size.
MAX_EMBED_INPUTS = 256
# Texts per embeddings request at the balancer (OpenAI's `input` array limit).
MAX_EMBED_REQUEST_INPUTS = 2048
# What the wire types of SamplingParams hold (JSON numbers are checked against these before a message is built).
UINT32_MAX = 2**32 - 1
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
_RESPONSE_FORMATS = frozenset(runtime_pb2.ResponseFormat.values())


@dataclass(frozen=True)
class Range:
    """A closed range of a float sampling parameter (open at the low end when `low_open`); NaN and inf are out."""

    low: float
    high: float
    low_open: bool = False

    def contains(self, value: float) -> bool:
        # The fields are float32: 0.01 arrives as 0.0099999998, so the bounds are compared as float32 too.
        low, high = _float32(self.low), _float32(self.high)
        above = low < value if self.low_open else low <= value
        return math.isfinite(value) and above and value <= high

    def problem(self, value: float) -> str:
        """What follows the field's name in the error message."""
        if self.low_open:
            return f"must be in ({self.low:g}, {self.high:g}], got {value:g}"
        return f"must be between {self.low:g} and {self.high:g}, got {value:g}"


def _float32(value: float) -> float:
    return float(struct.unpack("f", struct.pack("f", value))[0])


# OpenAI's ranges for temperature, top_p, frequency/presence; min_p is a fraction; a repetition penalty is a
# divisor, so it must stay positive. top_p 0 would leave no token to sample from. In the order they are checked.
SAMPLING_RANGES: dict[str, Range] = {
    "temperature": Range(0.0, 2.0),
    "top_p": Range(0.0, 1.0, low_open=True),
    "frequency_penalty": Range(-2.0, 2.0),
    "presence_penalty": Range(-2.0, 2.0),
    "min_p": Range(0.0, 1.0),
    "repetition_penalty": Range(0.01, 10.0),
}


@dataclass(frozen=True)
class Violation:
    """One bad SamplingParams field: `field` is its proto name, `index` the element of a repeated one at fault."""

    field: str
    # Follows the field's name: "must be between 0 and 2, got 5" (a caller may name the field differently).
    problem: str
    index: int | None = None

    def message(self, name: str) -> str:
        return f"{name} {self.problem}"

    def path(self, name: str) -> str:
        return name if self.index is None else f"{name}[{self.index}]"


def sampling_violations(params: runtime_pb2.SamplingParams) -> list[Violation]:
    """Every value of `params` outside the limits above, in a fixed order (a caller that reports one reports the
    first). Only what needs no model: token counts against the context are the runtime engine's to check."""
    found: list[Violation] = []
    for field, bounds in SAMPLING_RANGES.items():
        if params.HasField(field) and not bounds.contains(getattr(params, field)):
            found.append(Violation(field, bounds.problem(getattr(params, field))))
    if params.response_format not in _RESPONSE_FORMATS:
        found.append(Violation("response_format", f"is not a known format ({params.response_format})"))
    if params.HasField("max_tokens") and params.max_tokens < 1:
        found.append(Violation("max_tokens", "must be at least 1 (leave it unset for the default)"))
    if len(params.stop) > MAX_STOP_STRINGS:
        found.append(Violation("stop", f"takes at most {MAX_STOP_STRINGS} strings, got {len(params.stop)}"))
    for index, stop in enumerate(params.stop):
        if not stop:
            found.append(Violation("stop", "strings must not be empty", index))
        elif len(stop) > MAX_STOP_CHARS:
            found.append(Violation("stop", f"strings are at most {MAX_STOP_CHARS} characters", index))
    if params.top_logprobs > MAX_TOP_LOGPROBS:
        found.append(Violation("top_logprobs",
                               f"must be between 0 and {MAX_TOP_LOGPROBS}, got {params.top_logprobs}"))
    elif params.top_logprobs and not params.logprobs:
        found.append(Violation("top_logprobs", "needs logprobs set to true"))
    return found
