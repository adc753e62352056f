"""The scheduler a controller runs, from its configuration: a placement profile of plugin instances."""

from __future__ import annotations

from typing import Any, Mapping

from clowder_common.errors import InvalidArgument
from clowder_controller.scheduling.framework import Scheduler
from clowder_controller.scheduling.registry import SchedulingPlugins, builtin_plugins

PLACEMENTS = ("spread", "binpack")
FIELD = "placement"


def placement_profile(placement: str, locality_weight: float) -> dict[str, Any]:
    """Entries as in routing profiles: a type name, or {type, name, weight (scorers), parameters...}."""
    return {
        # Cheap filters first: each one shrinks the list the next one walks.
        "filters": ["labels", "gpus", "memory"],
        # How full nodes get weighs 1; preferring nodes that hold the model, locality_weight.
        "scorers": [{"type": placement, "weight": 1}, {"type": "locality", "weight": locality_weight}],
    }


def build_profile(name: str, spec: Mapping[str, Any], plugins: SchedulingPlugins | None = None) -> Scheduler:
    """A Scheduler for placement profile `spec`; InvalidArgument names what is wrong with it."""
    plugins = plugins or builtin_plugins()
    where = f"placement profile {name!r}"
    filters = plugins.build_all("filter", spec.get("filters"), None, where=where, field=FIELD)
    scorers = plugins.build_all("scorer", spec.get("scorers"), None, where=where, field=FIELD, weighted=True)
    return Scheduler(name, filters, scorers)


def build_scheduler(placement: str = "spread", locality_weight: float = 0.3,
                    plugins: SchedulingPlugins | None = None) -> Scheduler:
    if placement not in PLACEMENTS:
        raise ValueError(f"placement must be one of {', '.join(PLACEMENTS)}, not {placement!r}")
    try:
        return build_profile(placement, placement_profile(placement, locality_weight), plugins)
    except InvalidArgument as err:
        # Only a bad locality_weight gets here: the configuration is what is wrong.
        raise ValueError(err.message) from None
