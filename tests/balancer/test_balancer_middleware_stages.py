"""Middleware stages on their own: stream redaction across chunk splits, system prompt, groups, rate limits,
secret redaction, and configuration errors."""

from __future__ import annotations

import re

import pytest

from clowder.controller.v1 import resources_pb2
from clowder.runtime.v1 import runtime_pb2
from clowder_common.errors import InvalidArgument, PermissionDenied, ResourceExhausted, Unauthenticated

from clowder_balancer.apikeys import Principal
from clowder_balancer.middleware.access import GroupAccessStage
from clowder_balancer.middleware.base import RequestContext
from clowder_balancer.middleware.blocklist import BlocklistStage, StreamRedactor
from clowder_balancer.middleware.chain import Chains, build_stages
from clowder_balancer.middleware.rate_limit import RateLimitStage
from clowder_balancer.middleware.redaction import redact
from clowder_balancer.middleware.system_prompt import SystemPromptStage

from balancer_helpers import Clock

pytestmark = pytest.mark.unit


def ctx(key: str = "", groups: tuple[str, ...] = ()) -> RequestContext:
    return RequestContext("rid", "m", "http", Principal(key, frozenset(groups)))


def chat(*pairs: tuple[str, str]) -> runtime_pb2.GenerateRequest:
    request = runtime_pb2.GenerateRequest()
    request.chat.messages.extend(runtime_pb2.ChatMessage(role=r, content=c) for r, c in pairs)
    return request


@pytest.mark.parametrize(
    "chunks",
    [
        ["the password is hunter2 ok"],
        ["the password is hun", "ter2 ok"],
        ["the password is h", "u", "n", "t", "e", "r", "2", " ok"],
        ["the password is hunter", "2", " ok"],
        ["the password is ", "HUNTER2", " ok"],
        ["", "the password is hunter2", "", " ok"],
    ],
)
def test_stream_redactor_never_lets_a_split_match_through(chunks) -> None:
    redactor = StreamRedactor(re.compile("hunter2", re.IGNORECASE), "[x]", max_match=7)
    emitted = [redactor.feed(c) for c in chunks] + [redactor.flush()]
    out = "".join(emitted)
    assert out == "the password is [x] ok"
    # No prefix of what was shown so far ever held the secret either.
    shown = ""
    for piece in emitted:
        shown += piece
        assert "hunter2" not in shown.lower()


def test_stream_redactor_holds_back_only_what_it_must() -> None:
    redactor = StreamRedactor(re.compile("secret"), "#", max_match=6)
    assert redactor.feed("hello world") == "hello "  # the last 5 characters may still start "secret"
    assert redactor.feed("!") == "w"
    assert redactor.flush() == "orld!"


@pytest.mark.parametrize(
    ("options", "messages", "expected_roles", "first"),
    [
        ({"text": "Be nice."}, [("user", "hi")], ["system", "user"], "Be nice."),
        ({"text": "Be nice."}, [("system", "own"), ("user", "hi")], ["system", "system", "user"], "Be nice."),
        ({"text": "Be nice.", "mode": "if-missing"}, [("system", "own"), ("user", "hi")], ["system", "user"], "own"),
        ({"text": "Be nice.", "mode": "if-missing"}, [("user", "hi")], ["system", "user"], "Be nice."),
    ],
)
async def test_system_prompt(options, messages, expected_roles, first) -> None:
    request = chat(*messages)
    await SystemPromptStage(options).before(ctx(), request)
    assert [m.role for m in request.chat.messages] == expected_roles
    assert request.chat.messages[0].content == first


async def test_system_prompt_leaves_completions_alone() -> None:
    request = runtime_pb2.GenerateRequest(prompt="raw")
    await SystemPromptStage({"text": "x"}).before(ctx(), request)
    assert request.prompt == "raw" and not request.HasField("chat")


@pytest.mark.parametrize(
    ("key", "groups", "error"),
    [
        ("k1", ("research",), None),
        ("k1", ("ops", "research"), None),
        ("k1", ("ops",), PermissionDenied),
        ("k1", (), PermissionDenied),
        ("", (), Unauthenticated),
    ],
)
async def test_group_access(key, groups, error) -> None:
    stage = GroupAccessStage(allowed=["research", "admins"])
    if error is None:
        await stage.before(ctx(key, groups), chat(("user", "hi")))
    else:
        with pytest.raises(error):
            await stage.before(ctx(key, groups), chat(("user", "hi")))


async def test_rate_limit_requests_per_minute_per_key() -> None:
    clock = Clock(1000.0)
    stage = RateLimitStage({"requests_per_minute": 2}, clock=clock)
    for _ in range(2):
        await stage.before(ctx("a"), chat(("user", "hi")))
    with pytest.raises(ResourceExhausted) as info:
        await stage.before(ctx("a"), chat(("user", "hi")))
    assert info.value.reason == "RATE_LIMIT_EXCEEDED" and 59 <= info.value.retry_after <= 60
    await stage.before(ctx("b"), chat(("user", "hi")))  # another key has its own budget
    clock.now += 60.5
    await stage.before(ctx("a"), chat(("user", "hi")))  # the window slid


async def test_rate_limit_tokens_per_minute() -> None:
    clock = Clock(1000.0)
    stage = RateLimitStage({"tokens_per_minute": 100}, clock=clock)
    served = ctx("a")
    await stage.before(served, chat(("user", "hi")))
    served.prompt_tokens, served.completion_tokens = 60, 50
    stage.after(served)
    with pytest.raises(ResourceExhausted) as info:
        await stage.before(ctx("a"), chat(("user", "hi")))
    assert info.value.reason == "RATE_LIMIT_EXCEEDED" and "tokens per minute" in info.value.message
    clock.now += 61
    await stage.before(ctx("a"), chat(("user", "hi")))


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Authorization: Bearer abc.def-123", "Authorization: Bearer [REDACTED]"),
        ("key ck-0123456789ab-" + "A" * 43 + " end", "key [REDACTED] end"),
        ("use sk-proj-abcdefghijklmnop1234", "use [REDACTED]"),
        ("https://user:pa55@host/path", "https://user:[REDACTED]@host/path"),
        ("nothing secret here", "nothing secret here"),
    ],
)
def test_redact(text, expected) -> None:
    assert redact({"a": [text]}) == {"a": [expected]}


async def test_blocklist_rejects_input_and_names_the_field() -> None:
    stage = BlocklistStage({"patterns": [r"forbidden\s+word"]})
    await stage.before(ctx(), chat(("user", "fine")))
    with pytest.raises(InvalidArgument) as info:
        await stage.before(ctx(), chat(("system", "ok"), ("user", "a FORBIDDEN  word")))
    assert info.value.violations[0].field == "messages[1].content"
    assert "forbidden" not in info.value.message.lower()


def _config(*specs: dict, groups: tuple[str, ...] = ()) -> resources_pb2.ImageConfiguration:
    config = resources_pb2.ImageConfiguration(allowed_groups=groups)
    for spec in specs:
        entry = config.middleware.add(name=spec["name"])
        entry.options.update(spec.get("options", {}))
    return config


@pytest.mark.parametrize(
    "spec",
    [
        {"name": "nope"},
        {"name": "rate-limit", "options": {}},
        {"name": "rate-limit", "options": {"requests_per_minute": -1}},
        {"name": "blocklist", "options": {"patterns": ["("]}},
        {"name": "blocklist", "options": {"patterns": []}},
        {"name": "webhook", "options": {"url": "ftp://x"}},
        {"name": "system-prompt", "options": {"text": ""}},
        {"name": "audit", "options": {}},
        {"name": "groups", "options": {"allowed": []}},
    ],
)
def test_bad_stage_options_are_rejected(spec) -> None:
    with pytest.raises(InvalidArgument):
        build_stages(_config(spec))


def test_chain_order_and_reuse() -> None:
    config = _config({"name": "system-prompt", "options": {"text": "x"}},
                     {"name": "rate-limit", "options": {"requests_per_minute": 5}}, groups=("g",))
    chains = Chains()
    stages = chains.stages("m", config)
    assert [s.name for s in stages] == ["groups", "system-prompt", "rate-limit"]
    # Same configuration: the same stage objects (rate-limit windows survive between requests).
    assert chains.stages("m", config) is stages
    changed = _config({"name": "rate-limit", "options": {"requests_per_minute": 6}})
    assert [s.name for s in chains.stages("m", changed)] == ["rate-limit"]


def test_a_broken_configuration_fails_closed() -> None:
    from clowder_common.errors import Internal

    with pytest.raises(Internal):
        Chains().stages("m", _config({"name": "nope"}))


def test_webhook_payload_carries_every_choice_and_redacts_them() -> None:
    from clowder_balancer.middleware.webhook import WebhookStage

    stage = WebhookStage({"url": "http://127.0.0.1:9/hook", "include_content": True})
    ctx = RequestContext("r1", "m", "http", finish_reason="stop", output=["first"])
    assert "choices" not in stage.payload(ctx)  # a single choice: nothing more than before
    ctx.choices = {1: ("length", ["second, key sk-", "abcdefghijklmnopqrstuvwx"]), 0: ("stop", ["first"])}
    body = stage.payload(ctx)
    assert [(c["index"], c["finish_reason"]) for c in body["choices"]] == [(0, "stop"), (1, "length")]
    assert "abcdefghijklmnopqrstuvwx" not in body["choices"][1]["output"]
