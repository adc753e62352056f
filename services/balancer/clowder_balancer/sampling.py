"""Sampling parameters checked the same way for the HTTP and gRPC faces, against the request limits shared with the
runtime (clowder_common.limits)."""

from __future__ import annotations

from typing import Mapping

from clowder.runtime.v1 import runtime_pb2
from clowder_common.errors import InvalidArgument
from clowder_common.limits import sampling_violations


def validate_sampling(params: runtime_pb2.SamplingParams, names: Mapping[str, str] | None = None) -> None:
    """Raise InvalidArgument naming the first bad field; `names` maps proto field names to the caller's.

    A bad element of `stop` is reported as the whole parameter, as OpenAI's errors do.
    """
    violations = sampling_violations(params)
    if violations:
        first = violations[0]
        name = (names or {}).get(first.field, first.field)
        raise InvalidArgument(first.message(name), field=name)
