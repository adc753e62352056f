"""Routing scorers: load, prefix affinity, session affinity and adapter affinity, each scoring in [0, 1]."""

from __future__ import annotations

import pytest

from clowder_balancer.routing.adapter_scorer import AdapterScorer
from clowder_balancer.routing.base import Candidate, RouteRequest
from clowder_balancer.routing.load_scorer import LoadScorer
from clowder_balancer.routing.prefill_scorer import PrefillScorer
from clowder_balancer.routing.prefix_scorer import PrefixScorer
from clowder_balancer.routing.session_scorer import SessionScorer
from clowder_balancer.stats import RuntimeStats

from balancer_helpers import Clock

pytestmark = pytest.mark.unit


def c(rid: str, **kw) -> Candidate:
    return Candidate(rid, rid, kw.pop("in_flight", 0), **kw)


@pytest.mark.parametrize(
    ("saturation", "candidates", "expected"),
    [
        (4, [c("a"), c("b", in_flight=1), c("b2", in_flight=2)], {"a": 1.0, "b": 0.75, "b2": 0.5}),
        (4, [c("a", in_flight=9)], {"a": 0.0}),  # past saturation stays at 0, never negative
        (4, [c("a", running=1, waiting=2)], {"a": 0.25}),  # the runtime's queue counts
        (4, [c("a", in_flight=3, running=1)], {"a": 0.25}),  # our own in-flight is fresher than its report
        (2, [c("a", waiting=1)], {"a": 0.5}),
    ],
)
def test_load_scorer(saturation, candidates, expected) -> None:
    assert LoadScorer(saturation).score(RouteRequest("m"), candidates) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("history", "blocks", "expected"),
    [
        ({}, (1, 2, 3, 4), {"a": 0.0, "b": 0.0}),
        ({"a": (1, 2)}, (1, 2, 3, 4), {"a": 0.5, "b": 0.0}),
        ({"a": (1, 2), "b": (1, 2, 3, 4)}, (1, 2, 3, 4), {"a": 0.5, "b": 1.0}),
        # Chained hashes: a later block without the first one is no prefix.
        ({"a": (2, 3, 4)}, (1, 2, 3, 4), {"a": 0.0, "b": 0.0}),
        ({"a": (1, 2)}, (), {"a": 0.0, "b": 0.0}),  # a prompt shorter than a block has nothing to match
    ],
)
def test_prefix_scorer(history, blocks, expected) -> None:
    scorer = PrefixScorer()
    for address, seen in history.items():
        scorer.routed(RouteRequest("m", blocks=seen), c(address))
    assert scorer.score(RouteRequest("m", blocks=blocks), [c("a"), c("b")]) == pytest.approx(expected)


def test_prefix_scorer_learns_the_answer_and_forgets_a_replica() -> None:
    scorer = PrefixScorer()
    scorer.finished(RouteRequest("m", blocks=(1,)), c("a"), (1, 2, 3))
    assert scorer.score(RouteRequest("m", blocks=(1, 2, 3)), [c("a")]) == {"a": 1.0}
    scorer.forget("a")
    assert scorer.score(RouteRequest("m", blocks=(1, 2, 3)), [c("a")]) == {"a": 0.0}


@pytest.mark.parametrize(
    ("runtime_blocks", "tokens_per_block", "kept_of_four"),
    [
        (0, 16, 0),  # the runtime holds nothing (restarted, evicted): forget the guess
        (100, 16, 4),  # it holds far more than we remember: keep all
        # 4 blocks x 16 tokens x 4 chars = 256 chars = 1 text block of 256, with 2x slack: keep the newest two.
        (4, 16, 2),
        (0, 0, 4),  # a runtime that does not report: keep guessing
    ],
)
def test_prefix_scorer_corrected_by_runtime_report(runtime_blocks, tokens_per_block, kept_of_four) -> None:
    clock = Clock()
    scorer = PrefixScorer(block_chars=256, clock=clock)
    scorer.routed(RouteRequest("m", blocks=(1, 2, 3, 4)), c("a"))
    report = RuntimeStats(prefix_blocks=runtime_blocks, prefix_block_tokens=tokens_per_block)
    # A report right after routing may predate the prefill: it trims nothing just sent.
    scorer.runtime_report("a", report)
    assert scorer.index.size("a") == 4
    clock.now += 31
    scorer.runtime_report("a", report)
    assert scorer.index.size("a") == kept_of_four
    if kept_of_four == 2:
        # The newest blocks stay: the prefix (1, 2) is gone, so nothing of it matches any more.
        assert scorer.score(RouteRequest("m", blocks=(1, 2, 3, 4)), [c("a")]) == {"a": 0.0}


@pytest.mark.parametrize(
    ("routed", "session", "expected"),
    [
        ([("s1", "a")], "s1", {"a": 1.0, "b": 0.0}),
        ([("s1", "a"), ("s1", "b")], "s1", {"a": 0.0, "b": 1.0}),  # follows the latest placement
        ([("s1", "a")], "s2", {"a": 0.0, "b": 0.0}),
        ([("s1", "a")], "", {"a": 0.0, "b": 0.0}),
        ([("", "a")], "", {"a": 0.0, "b": 0.0}),  # no session key: nothing remembered
    ],
)
def test_session_scorer(routed, session, expected) -> None:
    scorer = SessionScorer()
    for key, address in routed:
        scorer.routed(RouteRequest("m", session=key), c(address))
    assert scorer.score(RouteRequest("m", session=session), [c("a"), c("b")]) == expected


def test_session_scorer_is_bounded_and_forgets_a_replica() -> None:
    scorer = SessionScorer(capacity=2)
    for i, address in enumerate(["a", "b", "a"]):
        scorer.routed(RouteRequest("m", session=f"s{i}"), c(address))
    assert scorer.score(RouteRequest("m", session="s0"), [c("a")]) == {"a": 0.0}  # evicted
    scorer.forget("a")
    assert scorer.score(RouteRequest("m", session="s2"), [c("a")]) == {"a": 0.0}
    assert scorer.score(RouteRequest("m", session="s1"), [c("b")]) == {"b": 1.0}


@pytest.mark.parametrize(
    ("adapter", "expected"),
    [("", {"a": 0.0, "b": 0.0}), ("x", {"a": 0.0, "b": 1.0}), ("z", {"a": 0.0, "b": 0.0})],
)
def test_adapter_scorer(adapter, expected) -> None:
    candidates = [c("a"), c("b", adapters=frozenset({"x"}))]
    assert AdapterScorer().score(RouteRequest("m", adapter=adapter), candidates) == expected


@pytest.mark.parametrize(
    ("history", "open_", "blocks", "expected"),
    [
        # Nothing known: the same work everywhere.
        ({}, {}, (1, 2, 3), {"a": 1.0, "b": 1.0}),
        # "a" holds 2 of 3 blocks: 1 block of work there, 3 on "b" -> (1+1)/(3+1).
        ({"a": (1, 2)}, {}, (1, 2, 3), {"a": 1.0, "b": 0.5}),
        # ...but 4 blocks of another prompt still prefill on "a": 5 there against 3 on "b".
        ({"a": (1, 2)}, {"a": (7, 8, 9, 10)}, (1, 2, 3), {"a": 4 / 6, "b": 1.0}),
        # A prompt shorter than a block still queues behind others' work.
        ({}, {"b": ()}, (), {"a": 1.0, "b": 0.5}),
    ],
)
def test_prefill_scorer(history, open_, blocks, expected) -> None:
    now = [0.0]
    scorer = PrefillScorer(clock=lambda: now[0])
    for address, seen in history.items():
        done = RouteRequest("m", blocks=seen)
        scorer.routed(done, c(address))
        now[0] += 1.0
        scorer.prefilled(done, c(address))
    for address, seen in open_.items():
        scorer.routed(RouteRequest("m", blocks=seen), c(address))
    assert scorer.score(RouteRequest("m", blocks=blocks), [c("a"), c("b")]) == pytest.approx(expected)


def test_prefill_scorer_counts_only_what_is_likely_left_of_others_prefill() -> None:
    now = [0.0]
    scorer = PrefillScorer(clock=lambda: now[0])
    # "a" was seen to prefill 4 blocks in 2 s: 2 blocks/s.
    first = RouteRequest("m", blocks=(1, 2, 3, 4))
    scorer.routed(first, c("a"))
    now[0] = 2.0
    scorer.prefilled(first, c("a"))
    # A conversation's next turn: "a" holds 4 of its 5 blocks, while another 6-block prompt prefills there.
    scorer.routed(RouteRequest("m", blocks=(7, 8, 9, 10, 11, 12)), c("a"))
    turn = RouteRequest("m", blocks=(1, 2, 3, 4, 5))
    # Just routed: all 6 ahead, 7 blocks of work on "a" against 5 on "b".
    assert scorer.score(turn, [c("a"), c("b")]) == pytest.approx({"a": 6 / 8, "b": 1.0})
    # 2 s later about 4 of them are done: 3 blocks on "a" against 5 on "b" — wait at home.
    now[0] = 4.0
    assert scorer.remaining("a") == pytest.approx(2.0)
    assert scorer.score(turn, [c("a"), c("b")]) == pytest.approx({"a": 1.0, "b": 4 / 6})
    # A replica never seen to prefill keeps the whole count.
    scorer.routed(RouteRequest("m", blocks=(20, 21, 22)), c("b"))
    now[0] = 100.0
    assert scorer.remaining("b") == 3


def test_prefill_scorer_takes_back_each_routing_once() -> None:
    scorer = PrefillScorer()
    request = RouteRequest("m", blocks=(1, 2, 3))
    scorer.routed(request, c("a"))
    scorer.routed(request, c("a"))  # n choices of one request: the second finds the prompt routed already
    assert scorer.pending("a") == 3 + 1
    scorer.prefilled(request, c("a"))
    scorer.prefilled(request, c("a"))
    scorer.prefilled(request, c("a"))  # an extra call changes nothing
    assert scorer.pending("a") == 0
    scorer.routed(request, c("b"))
    scorer.forget("b")
    assert scorer.pending("b") == 0
