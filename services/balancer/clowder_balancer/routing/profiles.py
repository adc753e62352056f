"""Routing profiles: named sets of plugin instances, built in or read from YAML, turned into Schedulers."""

from __future__ import annotations

import random
from typing import Any, Mapping

import yaml

from clowder_common.errors import InvalidArgument
from clowder_common.plugins import invalid, parse_spec

from clowder_balancer.routing.base import RoutingEnv
from clowder_balancer.routing.registry import RoutingPlugins, builtin_plugins
from clowder_balancer.routing.scheduler import Scheduler

DEFAULT_PROFILE = "default"
# The profile embedding requests are routed with: they leave nothing in a KV cache worth coming back to.
EMBEDDINGS_PROFILE = "embeddings"
SATURATION = 4
# Far above any replica's slots: the load scorer then ranks by load alone (least first) at any traffic.
EMBED_SATURATION = 1024

# Every profile starts with the same safety filters; what differs is how the survivors are ranked.
_SAFE = ["ready", "not-ejected", "adapter"]

FIELD = "routing_profiles_file"

# Entries are a type name, or {type, name, weight (scorers), parameters...}; {name: T, ...} alone means type T.
BUILTIN_PROFILES: dict[str, dict[str, Any]] = {
    # Least prefill work first (cache affinity and queued prompts in one unit), load second; a saturated
    # replica is filtered out, so affinity never makes a hotspot.
    "default": {
        "filters": [*_SAFE, {"type": "not-saturated", "saturation": SATURATION}],
        "scorers": [
            {"type": "session", "weight": 3},
            {"type": "prefill", "weight": 3},
            {"type": "adapter", "weight": 1},
            {"type": "load", "weight": 1, "saturation": SATURATION},
        ],
        "picker": "max-score",
    },
    "least-load": {
        "filters": _SAFE,
        "scorers": [{"type": "load", "weight": 1, "saturation": 64}],
        "picker": "max-score",
    },
    "round-robin": {"filters": _SAFE, "scorers": [], "picker": "round-robin"},
    "random": {"filters": _SAFE, "scorers": [], "picker": "random"},
    "least-in-flight": {"filters": _SAFE, "scorers": [], "picker": "least-in-flight"},
    EMBEDDINGS_PROFILE: {
        "filters": _SAFE,
        "scorers": [{"type": "load", "weight": 1, "saturation": EMBED_SATURATION}],
        "picker": "max-score",
    },
}

_SLOTS = ("filters", "scorers", "picker")


def build_scheduler(name: str, spec: Mapping[str, Any], env: RoutingEnv | None = None,
                    plugins: RoutingPlugins | None = None) -> Scheduler:
    """A Scheduler for profile `spec`; InvalidArgument names what is wrong with it."""
    where = f"routing profile {name!r}"
    env = env or RoutingEnv()
    plugins = plugins or builtin_plugins()
    unknown = sorted(str(k) for k in spec if k not in _SLOTS)
    if unknown:
        raise invalid(f"{where}: unknown key(s) {', '.join(unknown)} (keys: {', '.join(_SLOTS)})", FIELD,
                      f"profiles.{name}.{unknown[0]}")
    path = f"profiles.{name}"
    filters = plugins.build_all("filter", spec.get("filters"), env, where=where, field=FIELD, path=f"{path}.filters")
    scorers = plugins.build_all("scorer", spec.get("scorers"), env, where=where, field=FIELD, path=f"{path}.scorers",
                                weighted=True)
    at = f"{path}.picker"
    picker_spec = parse_spec(spec.get("picker", "max-score"), weighted=False, where=where, field=FIELD, path=at)
    picker = plugins.build("picker", picker_spec, env, where=where, field=FIELD, path=at)
    return Scheduler(name, filters, scorers, picker)


def load_profiles(path: str = "") -> dict[str, Mapping[str, Any]]:
    """Built-in profiles, overridden and extended by the `profiles:` mapping of the YAML file at `path`."""
    profiles: dict[str, Mapping[str, Any]] = dict(BUILTIN_PROFILES)
    if not path:
        return profiles
    try:
        with open(path, encoding="utf-8") as fh:
            data = yaml.safe_load(fh) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise InvalidArgument(f"cannot read routing profiles from {path}: {exc}", field=FIELD) from None
    found = data.get("profiles") if isinstance(data, Mapping) else None
    if not isinstance(found, Mapping):
        raise InvalidArgument(f"{path}: expected a 'profiles:' mapping", field=FIELD)
    for name, spec in found.items():
        if not isinstance(spec, Mapping):
            raise InvalidArgument(f"{path}: profile {name!r} must be a mapping", field=FIELD)
        profiles[str(name)] = spec
    return profiles


def schedulers_for(names: tuple[str, ...], path: str = "", env: RoutingEnv | None = None,
                   plugins: RoutingPlugins | None = None) -> tuple[Scheduler, ...]:
    """The Schedulers of profiles `names` (built-in or from the YAML file at `path`), in that order."""
    profiles = load_profiles(path)
    plugins = plugins or builtin_plugins()
    for name in names:
        if name not in profiles:
            raise InvalidArgument(
                f"unknown routing profile {name!r}; known: {', '.join(sorted(profiles))}", field="routing_profile"
            )
    schedulers = tuple(build_scheduler(name, profiles[name], env, plugins) for name in names)
    # Validate every profile now, so a typo in one not in use still fails at start, not at a later switch.
    for name, spec in profiles.items():
        if name not in names:
            build_scheduler(name, spec, env, plugins)
    return schedulers


def scheduler_for(profile: str, path: str = "", rng: random.Random | None = None, block_chars: int | None = None,
                  plugins: RoutingPlugins | None = None) -> Scheduler:
    """The Scheduler of one profile (every profile of the file validated too)."""
    env = RoutingEnv(rng=rng) if block_chars is None else RoutingEnv(block_chars=block_chars, rng=rng)
    (scheduler,) = schedulers_for((profile,), path, env, plugins)
    return scheduler
