"""The routing plugin types a balancer knows: one registration per plugin, its type name next to its class."""

from __future__ import annotations

from clowder_common.plugins import Registry

from clowder_balancer.routing.adapter_scorer import AdapterScorer
from clowder_balancer.routing.base import HOOKS, Filter, Picker, RoutingEnv, Scorer
from clowder_balancer.routing.filters import AdapterFilter, NotEjectedFilter, ReadyFilter, SaturationFilter
from clowder_balancer.routing.load_scorer import LoadScorer
from clowder_balancer.routing.pickers import LeastInFlightPicker, MaxScorePicker, RandomPicker, RoundRobinPicker
from clowder_balancer.routing.prefill_scorer import PrefillScorer
from clowder_balancer.routing.prefix_scorer import PrefixScorer
from clowder_balancer.routing.session_scorer import SessionScorer

# The slots of a profile and the interface a plugin in each must implement.
KINDS: dict[str, type] = {"filter": Filter, "scorer": Scorer, "picker": Picker}

RoutingPlugins = Registry[RoutingEnv]


def builtin_plugins() -> RoutingPlugins:
    """A new registry holding every built-in type (a caller may register more on it)."""
    plugins: RoutingPlugins = Registry(KINDS, HOOKS)
    plugins.add("filter", ReadyFilter, NotEjectedFilter, SaturationFilter, AdapterFilter)
    plugins.add("scorer", LoadScorer, PrefixScorer, PrefillScorer, SessionScorer, AdapterScorer)
    plugins.add("picker", MaxScorePicker, RoundRobinPicker, RandomPicker, LeastInFlightPicker)
    return plugins
