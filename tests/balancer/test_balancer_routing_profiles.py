"""Pickers, the scheduler and profiles: soft filters fall back, weights combine, the default profile's affinity
yields to load, and YAML profiles are validated."""

from __future__ import annotations

import random

import pytest

from clowder_common.errors import InvalidArgument

from clowder_balancer.routing.base import Candidate, RouteRequest
from clowder_balancer.routing.pickers import MaxScorePicker, RandomPicker, RoundRobinPicker
from clowder_balancer.routing.prefix_index import block_hashes, render_chat
from clowder_balancer.routing.profiles import BUILTIN_PROFILES, scheduler_for
from clowder.runtime.v1 import runtime_pb2

pytestmark = pytest.mark.unit


def c(rid: str, **kw) -> Candidate:
    return Candidate(rid, rid, kw.pop("in_flight", 0), **kw)


@pytest.mark.parametrize(
    ("scores", "allowed"),
    [
        ([0.1, 0.9, 0.5], {"b"}),
        ([0.5, 0.5, 0.1], {"a", "b"}),
        ([0.3], {"a"}),
        ([0.1 + 0.2, 0.3, 0.0], {"a", "b"}),  # float noise is a tie
    ],
)
def test_max_score_picker(scores, allowed) -> None:
    picker = MaxScorePicker(random.Random(1))
    scored = [(c(rid), s) for rid, s in zip("abc", scores)]
    assert {picker.pick(scored).replica_id for _ in range(100)} == allowed


def test_round_robin_and_random_pickers() -> None:
    scored = [(c(rid), 0.0) for rid in "cab"]
    rr = RoundRobinPicker()
    assert [rr.pick(scored).replica_id for _ in range(6)] == list("abcabc")
    rand = RandomPicker(random.Random(2))
    assert {rand.pick(scored).replica_id for _ in range(100)} == set("abc")
    for picker in (rr, RandomPicker(), MaxScorePicker()):
        with pytest.raises(ValueError):
            picker.pick([])


def _chat(*contents: str) -> tuple[int, ...]:
    messages = [runtime_pb2.ChatMessage(role="user" if i % 2 == 0 else "assistant", content=t)
                for i, t in enumerate(contents)]
    return block_hashes(render_chat(messages), 64)


def test_block_hashes_extend_with_the_conversation() -> None:
    first = _chat("x" * 200)
    longer = _chat("x" * 200, "y" * 100, "z" * 100)
    assert len(first) == len(render_chat([runtime_pb2.ChatMessage(role="user", content="x" * 200)]).encode()) // 64
    assert longer[: len(first)] == first and len(longer) > len(first)
    assert _chat("w" + "x" * 199)[0] != first[0]
    assert block_hashes("short", 64) == ()


@pytest.mark.parametrize(
    ("candidates", "allowed"),
    [
        # "a" holds the prompt's prefix and is not busy: affinity wins over an idle replica.
        ([c("a", in_flight=2), c("b")], {"a"}),
        # "a" is saturated (load 4 = the default saturation): affinity yields, the idle one serves.
        ([c("a", in_flight=4), c("b", in_flight=1)], {"b"}),
        ([c("a", running=2, waiting=2), c("b", in_flight=3)], {"b"}),
        # Every replica saturated: the soft filter steps aside rather than refuse, and affinity decides again.
        ([c("a", in_flight=5), c("b", in_flight=5)], {"a"}),
        # Ejected: avoided while another is there.
        ([c("a", ejected=True), c("b", in_flight=3)], {"b"}),
    ],
)
def test_default_profile_affinity_yields_to_load(candidates, allowed) -> None:
    scheduler = scheduler_for("default", rng=random.Random(3))
    blocks = (11, 12, 13)
    earlier = RouteRequest("m", blocks=blocks)
    scheduler.routed(earlier, c("a"))
    scheduler.prefilled(earlier, c("a"))
    assert {scheduler.schedule(RouteRequest("m", blocks=blocks), candidates).replica_id for _ in range(50)} == allowed


def test_default_profile_spreads_new_conversations_that_share_only_a_system_prompt() -> None:
    scheduler = scheduler_for("default", rng=random.Random(5))
    replicas = [c(rid) for rid in "abcd"]
    in_flight = dict.fromkeys("abcd", 0)
    placed = []
    for conversation in range(6):
        # One shared block (the system prompt), then six of the conversation's own.
        route = RouteRequest("m", blocks=(1, *(100 * conversation + k for k in range(2, 8))))
        chosen = scheduler.schedule(route, [c(r.replica_id, in_flight=in_flight[r.replica_id]) for r in replicas])
        scheduler.routed(route, chosen)
        in_flight[chosen.replica_id] += 1
        placed.append(chosen.replica_id)
    # Prompt affinity to the shared block must not stack prefills while a replica idles.
    assert sorted(in_flight.values()) == [1, 1, 2, 2], placed


def test_default_profile_follow_up_goes_home_unless_home_has_more_prompt_to_get_through() -> None:
    scheduler = scheduler_for("default", rng=random.Random(6))
    history = RouteRequest("m", blocks=tuple(range(1, 9)))
    scheduler.routed(history, c("a"))
    scheduler.prefilled(history, c("a"))
    follow_up = RouteRequest("m", blocks=tuple(range(1, 10)))
    assert scheduler.schedule(follow_up, [c("a", in_flight=1), c("b")]).replica_id == "a"
    # Two long prompts of other conversations are still prefilling on "a": re-evaluating 9 blocks on "b"
    # beats waiting behind 16 blocks there.
    for other in range(2):
        scheduler.routed(RouteRequest("m", blocks=tuple(range(100 * other + 100, 100 * other + 108))), c("a"))
    assert scheduler.schedule(follow_up, [c("a", in_flight=3), c("b")]).replica_id == "b"


def test_least_load_profile_ignores_affinity() -> None:
    scheduler = scheduler_for("least-load", rng=random.Random(4))
    scheduler.routed(RouteRequest("m", blocks=(1, 2)), c("a"))
    assert scheduler.schedule(RouteRequest("m", blocks=(1, 2)), [c("a", in_flight=1), c("b")]).replica_id == "b"


def test_every_builtin_profile_builds() -> None:
    for name in BUILTIN_PROFILES:
        assert scheduler_for(name).name == name


def test_yaml_profile_defines_plugins_and_weights(tmp_path) -> None:
    path = tmp_path / "profiles.yaml"
    path.write_text(
        "profiles:\n"
        "  sticky:\n"
        "    filters: [ready]\n"
        "    scorers:\n"
        "      - {name: session, weight: 5}\n"
        "      - {name: load, weight: 1, saturation: 2}\n"
        "    picker: max-score\n"
    )
    scheduler = scheduler_for("sticky", str(path))
    assert [type(p).__name__ for p in scheduler.plugins()] == ["ReadyFilter", "SessionScorer", "LoadScorer",
                                                               "MaxScorePicker"]
    scheduler.routed(RouteRequest("m", session="s"), c("a"))
    # Session weight 5 beats load 1: the busier home replica keeps its session.
    assert scheduler.schedule(RouteRequest("m", session="s"), [c("a", in_flight=1), c("b")]).replica_id == "a"


@pytest.mark.parametrize(
    ("text", "profile", "field"),
    [
        ("profiles:\n  p: {filters: [nope]}\n", "p", "routing_profiles_file"),
        ("profiles:\n  p: {scorers: [{name: load, weight: -1}]}\n", "p", "routing_profiles_file"),
        ("profiles:\n  p: {picker: best}\n", "p", "routing_profiles_file"),
        ("profiles: [1, 2]\n", "default", "routing_profiles_file"),
        # A broken profile fails at start even when another one is in use.
        ("profiles:\n  p: {scorers: [magic]}\n", "default", "routing_profiles_file"),
        ("profiles:\n  p: {}\n", "q", "routing_profile"),
    ],
)
def test_bad_profiles_are_rejected(tmp_path, text, profile, field) -> None:
    path = tmp_path / "profiles.yaml"
    path.write_text(text)
    with pytest.raises(InvalidArgument) as info:
        scheduler_for(profile, str(path))
    assert info.value.violations[0].field == field
