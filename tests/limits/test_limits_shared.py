"""One set of request limits (clowder_common.limits): the balancer's two faces and the runtime refuse the same
values, at the same bounds."""

from __future__ import annotations

import pytest

from clowder.controller.v1 import resources_pb2
from clowder.runtime.v1 import runtime_pb2
from clowder_balancer import openai_api
from clowder_balancer.sampling import validate_sampling
from clowder_common import limits
from clowder_common.errors import InvalidArgument
from clowder_runtime.validation import build_job

pytestmark = pytest.mark.unit

GRPC_NAMES = {f.name: f"sampling.{f.name}" for f in runtime_pb2.SamplingParams.DESCRIPTOR.fields}


def runtime_fields(sampling: runtime_pb2.SamplingParams) -> list[str]:
    request = runtime_pb2.GenerateRequest(prompt="hi", sampling=sampling)
    try:
        build_job(request, resources_pb2.ImageConfiguration())
    except InvalidArgument as err:
        return [v.field for v in err.violations]
    return []


def balancer_field(sampling: runtime_pb2.SamplingParams) -> str | None:
    try:
        validate_sampling(sampling, GRPC_NAMES)
    except InvalidArgument as err:
        return err.violations[0].field
    return None


def test_stop_strings_at_the_limit_pass_and_one_more_is_refused_everywhere():
    stops = [f"s{i}" for i in range(limits.MAX_STOP_STRINGS)]
    assert limits.MAX_STOP_STRINGS == 4  # OpenAI's limit
    openai_api.parse_request({"model": "m", "prompt": "p", "stop": stops}, "completion")
    assert balancer_field(runtime_pb2.SamplingParams(stop=stops)) is None
    assert runtime_fields(runtime_pb2.SamplingParams(stop=stops)) == []

    more = [*stops, "one more"]
    with pytest.raises(InvalidArgument) as caught:
        openai_api.parse_request({"model": "m", "prompt": "p", "stop": more}, "completion")
    assert openai_api.error_from(caught.value)[1]["error"]["param"] == "stop"
    assert "at most 4" in caught.value.message
    assert balancer_field(runtime_pb2.SamplingParams(stop=more)) == "sampling.stop"
    assert runtime_fields(runtime_pb2.SamplingParams(stop=more)) == ["stop"]


def test_a_too_long_stop_string_is_refused_by_the_balancer_too():
    long = "x" * (limits.MAX_STOP_CHARS + 1)
    assert balancer_field(runtime_pb2.SamplingParams(stop=["ok", long])) == "sampling.stop"
    assert runtime_fields(runtime_pb2.SamplingParams(stop=["ok", long])) == ["stop[1]"]


@pytest.mark.parametrize("field", sorted(limits.SAMPLING_RANGES))
def test_each_range_has_the_same_bounds_on_both_sides(field):
    bounds = limits.SAMPLING_RANGES[field]
    for inside in (bounds.high, (bounds.low + bounds.high) / 2):
        sampling = runtime_pb2.SamplingParams(**{field: inside})
        assert balancer_field(sampling) is None and runtime_fields(sampling) == [], (field, inside)
    for outside in (bounds.high + 0.5, bounds.low - 0.5, float("nan")):
        sampling = runtime_pb2.SamplingParams(**{field: outside})
        assert balancer_field(sampling) == f"sampling.{field}", (field, outside)
        assert runtime_fields(sampling) == [field], (field, outside)
    low = runtime_pb2.SamplingParams(**{field: bounds.low})
    expected = [field] if bounds.low_open else []
    assert runtime_fields(low) == expected and (balancer_field(low) is not None) == bounds.low_open


def test_top_logprobs_bound_and_its_logprobs_flag():
    fine = runtime_pb2.SamplingParams(logprobs=True, top_logprobs=limits.MAX_TOP_LOGPROBS)
    assert balancer_field(fine) is None and runtime_fields(fine) == []
    over = runtime_pb2.SamplingParams(logprobs=True, top_logprobs=limits.MAX_TOP_LOGPROBS + 1)
    assert balancer_field(over) == "sampling.top_logprobs" and runtime_fields(over) == ["top_logprobs"]
    alone = runtime_pb2.SamplingParams(top_logprobs=3)
    assert balancer_field(alone) == "sampling.top_logprobs" and runtime_fields(alone) == ["top_logprobs"]
