"""The routing plugin model: types in a registry, instances named apart from their type, typed parameters checked
by each plugin's factory, hooks as declared interfaces (a partial or misspelled one refused at build time)."""

from __future__ import annotations

import pytest

from clowder_common.errors import InvalidArgument
from clowder_common.plugins import ParamError, Plugin, parse_params, weighted_sum

from clowder_balancer.routing.base import Candidate, Observer, RouteRequest, Scorer
from clowder_balancer.routing.load_scorer import LoadScorer
from clowder_balancer.routing.prefix_scorer import PrefixScorer
from clowder_balancer.routing.profiles import BUILTIN_PROFILES, EMBEDDINGS_PROFILE, build_scheduler, scheduler_for
from clowder_balancer.routing.registry import builtin_plugins

pytestmark = pytest.mark.unit


def c(rid: str, **kw) -> Candidate:
    return Candidate(rid, rid, kw.pop("in_flight", 0), **kw)


def test_one_type_runs_twice_under_two_names() -> None:
    scheduler = build_scheduler("p", {"scorers": [
        {"type": "load", "name": "load-tight", "weight": 2, "saturation": 2},
        {"type": "load", "name": "load-loose", "saturation": 64},
    ]})
    assert [(s.name, s.type, s.weight) for s in scheduler.scorers] == [("load-tight", "load", 2.0),
                                                                       ("load-loose", "load", 1.0)]
    tight, loose = (s.plugin for s in scheduler.scorers)
    assert isinstance(tight, LoadScorer) and (tight.saturation, loose.saturation) == (2, 64)


def test_the_name_form_of_todays_profiles_still_means_the_type() -> None:
    scheduler = build_scheduler("p", {"filters": [{"name": "not-saturated", "saturation": 6}],
                                      "scorers": [{"name": "session", "weight": 5}, "prefix"]})
    assert [(f.name, f.type) for f in scheduler.filters] == [("not-saturated", "not-saturated")]
    assert [(s.name, s.type, s.weight) for s in scheduler.scorers] == [("session", "session", 5.0),
                                                                       ("prefix", "prefix", 1.0)]
    assert scheduler.filters[0].plugin.saturation == 6


@pytest.mark.parametrize(
    ("spec", "named"),
    [
        ({"scorers": [{"type": "load", "saturation": 0}]}, "'saturation' must be an integer >= 1, not 0"),
        ({"scorers": [{"type": "load", "saturation": "4"}]}, "'saturation' must be an integer"),
        ({"scorers": [{"type": "load", "saturation": True}]}, "'saturation' must be an integer"),
        ({"scorers": [{"type": "load", "saturaton": 4}]}, "'saturaton' is not a parameter of this plugin"),
        ({"scorers": [{"type": "session", "capacity": -1}]}, "'capacity' must be an integer >= 1"),
        ({"filters": [{"type": "ready", "hard": True}]}, "'hard' is not a parameter"),
        ({"filters": [{"type": "ready", "weight": 2}]}, "'weight' applies to scorers only"),
        ({"scorers": [{"type": "load", "weight": "heavy"}]}, "'weight' must be a number >= 0"),
        ({"scorers": ["load", "load"]}, "two scorers named 'load'"),
        ({"scorers": [{"type": "magic"}]}, "unknown scorer 'magic'"),
        ({"picker": "ready"}, "unknown picker 'ready'"),
        ({"scorer": ["load"]}, "unknown key(s) scorer"),
        ({"filters": "ready"}, "filters must be a list"),
    ],
)
def test_bad_instances_are_refused_naming_what_is_wrong(spec, named) -> None:
    with pytest.raises(InvalidArgument) as info:
        build_scheduler("p", spec)
    assert named in info.value.message
    assert "routing profile 'p'" in info.value.message
    assert info.value.violations[0].field == "routing_profiles_file"


@pytest.mark.parametrize(
    ("spec", "path"),
    [
        ({"scorers": ["session", {"type": "load", "name": "l", "saturation": 0}]}, "profiles.p.scorers[1].saturation"),
        ({"filters": ["ready", {"type": "not-ejected", "weight": 2}]}, "profiles.p.filters[1].weight"),
        ({"scorers": ["load", "load"]}, "profiles.p.scorers[1].name"),
        ({"picker": "best"}, "profiles.p.picker.type"),
        ({"picker": {"type": "random", "seed": 1}}, "profiles.p.picker.seed"),
        ({"scorer": []}, "profiles.p.scorer"),
    ],
)
def test_the_error_names_the_place_in_the_file_too(spec, path) -> None:
    with pytest.raises(InvalidArgument) as info:
        build_scheduler("p", spec)
    assert [v.field for v in info.value.violations] == ["routing_profiles_file", path]


def test_parameters_are_a_frozen_dataclass_with_defaults() -> None:
    params = parse_params(LoadScorer.Params, {})
    assert params.saturation == 4
    with pytest.raises(AttributeError):
        params.saturation = 5  # type: ignore[misc]
    with pytest.raises(ParamError) as info:
        parse_params(LoadScorer.Params, {"saturation": 1.5})
    assert info.value.key == "saturation"


class Remembers(Plugin, Scorer, Observer):
    """Declares Observer but spells one hook wrong: the class cannot be registered."""

    def score(self, request: RouteRequest, candidates) -> dict[str, float]:
        return {}

    def routed(self, request: RouteRequest, chosen: Candidate) -> None: ...

    def prefiled(self, request: RouteRequest, chosen: Candidate) -> None: ...

    def finished(self, request: RouteRequest, chosen: Candidate, blocks: tuple[int, ...]) -> None: ...

    def forget(self, address: str) -> None: ...


class Undeclared:
    """Does not declare Observer, and has only part of it: the registry refuses it when building."""

    def score(self, request: RouteRequest, candidates) -> dict[str, float]:
        return {}

    def routed(self, request: RouteRequest, chosen: Candidate) -> None: ...

    def forget(self, address: str) -> None: ...


def test_a_misspelled_hook_is_an_error_at_registration_or_build() -> None:
    plugins = builtin_plugins()
    with pytest.raises(TypeError, match="prefilled"):
        plugins.register("scorer", "remembers", Remembers.create)
    plugins.register("scorer", "undeclared", lambda params, env: Undeclared())
    with pytest.raises(TypeError, match="has routed, forget of Observer but not prefilled, finished"):
        build_scheduler("p", {"scorers": ["undeclared"]}, plugins=plugins)


def test_a_plugin_in_the_wrong_slot_is_refused() -> None:
    plugins = builtin_plugins()
    plugins.register("picker", "scores", LoadScorer.create)  # a scorer has no pick()
    with pytest.raises(TypeError, match="is no Picker"):
        build_scheduler("p", {"picker": "scores"}, plugins=plugins)
    with pytest.raises(ValueError, match="registered already"):
        plugins.register("scorer", "load", LoadScorer.create)


def test_registering_on_one_registry_leaves_the_built_in_one_alone() -> None:
    plugins = builtin_plugins()
    plugins.register("scorer", "prefix-again", PrefixScorer.create)
    assert "prefix-again" in plugins.types("scorer")
    assert "prefix-again" not in builtin_plugins().types("scorer")
    assert "prefix-again" in plugins.copy().types("scorer")


def test_hooks_reach_exactly_the_plugins_that_declare_them() -> None:
    scheduler = scheduler_for("default")
    observers = {type(p).__name__ for p in scheduler._observers}
    assert observers == {"SessionScorer", "PrefillScorer"}
    assert scheduler.uses_blocks
    assert not scheduler_for("least-load").uses_blocks


@pytest.mark.parametrize(
    ("scored", "expected"),
    [
        ([], {"a": 0.0, "b": 0.0}),
        ([(2.0, {"a": 0.5, "b": 1.0})], {"a": 1.0, "b": 2.0}),
        ([(1.0, {"a": 1.7, "b": -3.0})], {"a": 1.0, "b": 0.0}),  # clamped to [0, 1]
        ([(1.0, {"a": 1.0}), (3.0, {"b": 0.5})], {"a": 1.0, "b": 1.5}),  # left out: 0
    ],
)
def test_weighted_sum_is_the_scorer_convention(scored, expected) -> None:
    assert weighted_sum(["a", "b"], scored) == pytest.approx(expected)


def test_embeddings_profile_is_least_load_and_can_be_redefined(tmp_path) -> None:
    assert EMBEDDINGS_PROFILE in BUILTIN_PROFILES
    scheduler = scheduler_for(EMBEDDINGS_PROFILE)
    loads = [c("a", in_flight=3), c("b", in_flight=1, waiting=1), c("c", in_flight=1)]
    assert {scheduler.schedule(RouteRequest("m"), loads).replica_id for _ in range(30)} == {"c"}
    path = tmp_path / "profiles.yaml"
    path.write_text("profiles:\n  embeddings: {filters: [ready], picker: round-robin}\n")
    assert type(scheduler_for(EMBEDDINGS_PROFILE, str(path)).picker.plugin).__name__ == "RoundRobinPicker"
