"""The placement plugin types a controller knows: one registration per plugin, its type name next to its class."""

from __future__ import annotations

from clowder_common.plugins import Registry
from clowder_controller.scheduling.framework import Filter, Scorer
from clowder_controller.scheduling.gpus import GpuFit
from clowder_controller.scheduling.labels import LabelMatch
from clowder_controller.scheduling.locality import Locality
from clowder_controller.scheduling.memory import MemoryFit
from clowder_controller.scheduling.spread import BinPack, Spread

# The slots of a placement profile and the interface a plugin in each must implement.
KINDS: dict[str, type] = {"filter": Filter, "scorer": Scorer}

# Placement plugins need nothing from the framework besides their parameters.
SchedulingPlugins = Registry[None]


def builtin_plugins() -> SchedulingPlugins:
    """A new registry holding every built-in type (a caller may register more on it)."""
    plugins: SchedulingPlugins = Registry(KINDS)
    plugins.add("filter", LabelMatch, GpuFit, MemoryFit)
    plugins.add("scorer", Spread, BinPack, Locality)
    return plugins
