"""Routing profiles: named plugin sets, built in or read from YAML, turned into Schedulers."""

from __future__ import annotations

import random
from typing import Any, Mapping

import yaml

from clowder_common.errors import InvalidArgument

from clowder_balancer.routing.adapter_scorer import AdapterScorer
from clowder_balancer.routing.filters import AdapterFilter, NotEjectedFilter, ReadyFilter, SaturationFilter
from clowder_balancer.routing.load_scorer import LoadScorer
from clowder_balancer.routing.pickers import LeastInFlightPicker, MaxScorePicker, RandomPicker, RoundRobinPicker
from clowder_balancer.routing.prefix_index import DEFAULT_BLOCK_CHARS
from clowder_balancer.routing.prefill_scorer import PrefillScorer
from clowder_balancer.routing.prefix_scorer import PrefixScorer
from clowder_balancer.routing.scheduler import Scheduler, WeightedScorer
from clowder_balancer.routing.session_scorer import SessionScorer

DEFAULT_PROFILE = "default"
SATURATION = 4

# Every profile starts with the same safety filters; what differs is how the survivors are ranked.
_SAFE = ["ready", "not-ejected", "adapter"]

BUILTIN_PROFILES: dict[str, dict[str, Any]] = {
    # Least prefill work first (cache affinity and queued prompts in one unit), load second; a saturated
    # replica is filtered out, so affinity never makes a hotspot.
    "default": {
        "filters": [*_SAFE, {"name": "not-saturated", "saturation": SATURATION}],
        "scorers": [
            {"name": "session", "weight": 3},
            {"name": "prefill", "weight": 3},
            {"name": "adapter", "weight": 1},
            {"name": "load", "weight": 1, "saturation": SATURATION},
        ],
        "picker": "max-score",
    },
    "least-load": {
        "filters": _SAFE,
        "scorers": [{"name": "load", "weight": 1, "saturation": 64}],
        "picker": "max-score",
    },
    "round-robin": {"filters": _SAFE, "scorers": [], "picker": "round-robin"},
    "random": {"filters": _SAFE, "scorers": [], "picker": "random"},
    "least-in-flight": {"filters": _SAFE, "scorers": [], "picker": "least-in-flight"},
}


def _spec(item: Any, where: str) -> tuple[str, dict[str, Any]]:
    if isinstance(item, str):
        return item, {}
    if isinstance(item, Mapping) and isinstance(item.get("name"), str):
        return item["name"], {k: v for k, v in item.items() if k != "name"}
    raise InvalidArgument(f"{where}: expected a plugin name or a mapping with 'name'", field="routing_profiles_file")


def _option(options: Mapping[str, Any], key: str, default: Any, where: str) -> Any:
    value = options.get(key, default)
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
        raise InvalidArgument(f"{where}: '{key}' must be a non-negative number", field="routing_profiles_file")
    return value


def build_scheduler(name: str, spec: Mapping[str, Any], rng: random.Random | None = None,
                    block_chars: int = DEFAULT_BLOCK_CHARS) -> Scheduler:
    """A Scheduler for profile `spec`; InvalidArgument names what is wrong with it."""
    where = f"routing profile {name!r}"
    filters = []
    for item in spec.get("filters", []) or []:
        fname, options = _spec(item, where)
        if fname == "ready":
            filters.append(ReadyFilter())
        elif fname == "not-ejected":
            filters.append(NotEjectedFilter())
        elif fname == "adapter":
            filters.append(AdapterFilter())
        elif fname == "not-saturated":
            filters.append(SaturationFilter(_option(options, "saturation", SATURATION, where)))
        else:
            raise InvalidArgument(f"{where}: unknown filter {fname!r}", field="routing_profiles_file")
    scorers = []
    for item in spec.get("scorers", []) or []:
        sname, options = _spec(item, where)
        weight = float(_option(options, "weight", 1.0, where))
        if sname == "load":
            scorer: Any = LoadScorer(_option(options, "saturation", SATURATION, where))
        elif sname == "prefix":
            scorer = PrefixScorer(block_chars=block_chars)
        elif sname == "prefill":
            scorer = PrefillScorer(block_chars=block_chars)
        elif sname == "session":
            scorer = SessionScorer()
        elif sname == "adapter":
            scorer = AdapterScorer()
        else:
            raise InvalidArgument(f"{where}: unknown scorer {sname!r}", field="routing_profiles_file")
        scorers.append(WeightedScorer(scorer, weight))
    pname = spec.get("picker", "max-score")
    pickers = {
        "max-score": lambda: MaxScorePicker(rng),
        "round-robin": RoundRobinPicker,
        "random": lambda: RandomPicker(rng),
        "least-in-flight": lambda: LeastInFlightPicker(rng),
    }
    if pname not in pickers:
        raise InvalidArgument(f"{where}: unknown picker {pname!r}", field="routing_profiles_file")
    return Scheduler(name, filters, scorers, pickers[pname]())


def load_profiles(path: str = "") -> dict[str, Mapping[str, Any]]:
    """Built-in profiles, overridden and extended by the `profiles:` mapping of the YAML file at `path`."""
    profiles: dict[str, Mapping[str, Any]] = dict(BUILTIN_PROFILES)
    if not path:
        return profiles
    try:
        with open(path, encoding="utf-8") as fh:
            data = yaml.safe_load(fh) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise InvalidArgument(f"cannot read routing profiles from {path}: {exc}", field="routing_profiles_file") from None
    found = data.get("profiles") if isinstance(data, Mapping) else None
    if not isinstance(found, Mapping):
        raise InvalidArgument(f"{path}: expected a 'profiles:' mapping", field="routing_profiles_file")
    for name, spec in found.items():
        if not isinstance(spec, Mapping):
            raise InvalidArgument(f"{path}: profile {name!r} must be a mapping", field="routing_profiles_file")
        profiles[str(name)] = spec
    return profiles


def scheduler_for(profile: str, path: str = "", rng: random.Random | None = None,
                  block_chars: int = DEFAULT_BLOCK_CHARS) -> Scheduler:
    profiles = load_profiles(path)
    if profile not in profiles:
        raise InvalidArgument(
            f"unknown routing profile {profile!r}; known: {', '.join(sorted(profiles))}", field="routing_profile"
        )
    scheduler = build_scheduler(profile, profiles[profile], rng, block_chars)
    # Validate every profile now, so a typo in one not in use still fails at start, not at a later switch.
    for name, spec in profiles.items():
        if name != profile:
            build_scheduler(name, spec)
    return scheduler
