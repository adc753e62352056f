"""Plugins by type name: a registry of factories, instances named apart from their type, typed parameters, hooks checked.

The balancer's routing (clowder_balancer.routing) and the controller's scheduling (clowder_controller.scheduling)
are both built from this: a profile lists plugin instances per slot (filters, scorers, ...), each instance is
`{type: T, name: N, weight: W, <parameters>}` (or just `T`; `{name: T, ...}` still means type T), a registry maps
each slot's type names to factories, and each factory parses its own parameters into a frozen dataclass.
"""

from __future__ import annotations

import dataclasses
import inspect
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, ClassVar, Generic, Self, TypeVar

from clowder_common.errors import FieldViolation, InvalidArgument

EnvT = TypeVar("EnvT")
ParamsT = TypeVar("ParamsT")
PluginT = TypeVar("PluginT")

# (the instance's parameters as written in the profile, what the framework hands every plugin) -> the plugin.
Factory = Callable[[Mapping[str, Any], EnvT], object]

# Keys of an instance entry that belong to the framework; the rest are the plugin's parameters.
SPEC_KEYS = ("type", "name", "weight")


class ParamError(ValueError):
    """A plugin parameter that is wrong; the registry adds where it was written (profile, slot, instance)."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key!r} {message}")
        self.key = key


@dataclasses.dataclass(frozen=True)
class NoParams:
    """The parameters of a plugin without any: unknown ones are still refused (a misspelled option must show)."""


def param(default: Any, *, min: float | None = None, max: float | None = None) -> Any:
    """A parameter field with bounds, for a plugin's Params dataclass: `saturation: int = param(4, min=1)`."""
    return dataclasses.field(default=default, metadata={"min": min, "max": max})


def parse_params(cls: type[ParamsT], raw: Mapping[str, Any]) -> ParamsT:
    """`raw` as the frozen dataclass `cls`: unknown keys, wrong types and values out of bounds raise ParamError.

    Fields may be int, float (an int is taken), bool or str; bounds come from param(). A bool is no number here,
    though Python says it is one: `saturation: true` is a typo, not 1.
    """
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    for key in raw:
        if key not in fields:
            known = ", ".join(sorted(fields)) or "none"
            raise ParamError(str(key), f"is not a parameter of this plugin (parameters: {known})")
    values: dict[str, Any] = {}
    for name, f in fields.items():
        if name not in raw:
            continue
        values[name] = _check(name, hints[name], raw[name], f.metadata)
    return cls(**values)


def _check(key: str, kind: Any, value: Any, bounds: Mapping[str, Any]) -> Any:
    if kind is bool:
        if not isinstance(value, bool):
            raise ParamError(key, f"must be true or false, not {value!r}")
        return value
    if kind is str:
        if not isinstance(value, str):
            raise ParamError(key, f"must be a string, not {value!r}")
        return value
    if kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
        what = "an integer"
    elif kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        what = "a number"
        value = float(value) if ok else value
    else:
        raise TypeError(f"parameter {key!r} has type {kind!r}; plugin parameters are int, float, bool or str")
    low, high = bounds.get("min"), bounds.get("max")
    if low is not None:
        what += f" >= {low:g}"
    if high is not None:
        what += f" <= {high:g}"
    if not ok or (low is not None and value < low) or (high is not None and value > high):
        raise ParamError(key, f"must be {what}, not {value!r}")
    return value


class Plugin:
    """Base of a plugin class: its type name, its parameters, and the factory a registry calls (`Registry.add`).

    The default factory parses the profile's parameters into `Params` (a frozen dataclass; none by default) and
    passes its fields to the constructor as keywords; a plugin that also needs the framework's `env` overrides it.
    """

    TYPE: ClassVar[str] = ""
    Params: ClassVar[type[Any]] = NoParams

    @classmethod
    def create(cls, params: Mapping[str, Any], env: Any) -> Self:
        return cls(**dataclasses.asdict(parse_params(cls.Params, params)))


@dataclasses.dataclass(frozen=True)
class PluginSpec:
    """One instance entry of a profile: which type, under which name, its weight (scorers) and parameters."""

    type: str
    name: str
    weight: float = 1.0
    params: Mapping[str, Any] = dataclasses.field(default_factory=dict)


def invalid(message: str, field: str, path: str = "") -> InvalidArgument:
    """INVALID_ARGUMENT on the configuration `field`, and on `path` inside it (e.g. profiles.p.scorers[1].weight)."""
    violations = [FieldViolation(field, message)]
    if path:
        violations.append(FieldViolation(path, message))
    return InvalidArgument(message, violations=violations)


def _at(path: str, key: str) -> str:
    return f"{path}.{key}" if path else ""


def parse_spec(item: Any, *, weighted: bool, where: str, field: str, path: str = "") -> PluginSpec:
    """A profile entry: `T`, or `{type: T, name: N, weight: W, ...parameters}`; `{name: T}` alone means type T."""
    if isinstance(item, str):
        return PluginSpec(item, item)
    type_name = item.get("type", item.get("name")) if isinstance(item, Mapping) else None
    name = item.get("name", type_name) if isinstance(item, Mapping) else None
    if not isinstance(type_name, str) or not isinstance(name, str) or not type_name or not name:
        raise invalid(f"{where}: expected a plugin type or a mapping with 'type' (or 'name'), not {item!r}",
                      field, path)
    weight = 1.0
    if "weight" in item:
        if not weighted:
            raise invalid(f"{where}: {name!r}: 'weight' applies to scorers only", field, _at(path, "weight"))
        try:
            weight = _check("weight", float, item["weight"], {"min": 0})
        except ParamError as err:
            raise invalid(f"{where}: {name!r}: {err}", field, _at(path, "weight")) from None
    return PluginSpec(type_name, name, weight, {k: v for k, v in item.items() if k not in SPEC_KEYS})


@dataclasses.dataclass(frozen=True)
class Instance(Generic[PluginT]):
    """A built plugin under its instance name."""

    name: str
    type: str
    weight: float
    plugin: PluginT


def protocol_members(protocol: type) -> list[str]:
    """The attributes and methods a Protocol class declares (its own and its Protocol bases')."""
    names: list[str] = []
    for klass in reversed(protocol.__mro__):
        if klass in (object, typing.Protocol, typing.Generic) or not getattr(klass, "_is_protocol", False):
            continue
        for name in [*getattr(klass, "__annotations__", {}), *vars(klass)]:
            if not name.startswith("_") and name not in names:
                names.append(name)
    return names


def check_hooks(subject: object, hooks: Iterable[type]) -> None:
    """Raise TypeError when `subject` (a plugin or its class) has part of a hook interface but not all of it.

    The framework calls a hook only on plugins that implement its whole interface, so a misspelled or missing
    method would otherwise make the others silently never run. A class that subclasses the interface and leaves
    one of its (abstract) methods out is refused as well.
    """
    cls = subject if isinstance(subject, type) else type(subject)
    if inspect.isabstract(cls):
        missing = ", ".join(sorted(getattr(cls, "__abstractmethods__", ())))
        raise TypeError(f"plugin {cls.__qualname__} does not implement {missing} of the interfaces it declares")
    for hook in hooks:
        members = protocol_members(hook)
        present = [m for m in members if hasattr(subject, m)]
        if present and len(present) < len(members):
            missing = ", ".join(m for m in members if m not in present)
            raise TypeError(f"plugin {cls.__qualname__} has {', '.join(present)} of {hook.__name__} but not"
                            f" {missing}: misspelled? (a hook runs only on plugins with the whole interface)")


class Registry(Generic[EnvT]):
    """Type name -> factory, per slot kind (e.g. filter, scorer, picker); each kind has its declared interface.

    Built by a function of each framework (nothing registers itself at import); a test or an embedder may
    register more types on its own copy.
    """

    def __init__(self, kinds: Mapping[str, type], hooks: Sequence[type] = ()) -> None:
        self._kinds = dict(kinds)
        # Optional interfaces any plugin may implement (observers, stats consumers...): checked for completeness.
        self._hooks = tuple(hooks)
        self._factories: dict[str, dict[str, Factory[EnvT]]] = {kind: {} for kind in kinds}

    def register(self, kind: str, type_name: str, factory: Factory[EnvT]) -> None:
        """Add a type; a factory that is a classmethod has its class checked against the interfaces now."""
        if kind not in self._factories:
            raise ValueError(f"unknown plugin kind {kind!r} (kinds: {', '.join(self._kinds)})")
        if type_name in self._factories[kind]:
            raise ValueError(f"{kind} type {type_name!r} is registered already")
        owner = getattr(factory, "__self__", None)
        if isinstance(owner, type):
            self._check(owner, kind, type_name)
        self._factories[kind][type_name] = factory

    def add(self, kind: str, *classes: type[Plugin]) -> None:
        """Register plugin classes under their TYPE, with their create() as the factory."""
        for cls in classes:
            self.register(kind, cls.TYPE, cls.create)

    def types(self, kind: str) -> list[str]:
        return sorted(self._factories[kind])

    def copy(self) -> Registry[EnvT]:
        other: Registry[EnvT] = Registry(self._kinds, self._hooks)
        for kind, factories in self._factories.items():
            other._factories[kind].update(factories)
        return other

    def build(self, kind: str, spec: PluginSpec, env: EnvT, *, where: str, field: str,
              path: str = "") -> Instance[Any]:
        """The plugin of `spec`; InvalidArgument (on `field`, and `path` in it) for an unknown type or a bad
        parameter."""
        factory = self._factories[kind].get(spec.type)
        if factory is None:
            known = ", ".join(self.types(kind))
            raise invalid(f"{where}: unknown {kind} {spec.type!r} (known: {known})", field, _at(path, "type"))
        try:
            plugin = factory(spec.params, env)
        except ParamError as err:
            raise invalid(f"{where}: {kind} {spec.name!r} (type {spec.type}): {err}", field,
                          _at(path, err.key)) from None
        self._check(plugin, kind, spec.type)
        return Instance(spec.name, spec.type, spec.weight, plugin)

    def build_all(self, kind: str, items: Any, env: EnvT, *, where: str, field: str, path: str = "",
                  weighted: bool = False) -> list[Instance[Any]]:
        """The instances of one slot's list (at `path` in `field`), in order; two under one name are refused."""
        if items is None:
            return []
        if not isinstance(items, (list, tuple)):
            raise invalid(f"{where}: {kind}s must be a list, not {items!r}", field, path)
        built: list[Instance[Any]] = []
        for index, item in enumerate(items):
            at = f"{path}[{index}]" if path else ""
            spec = parse_spec(item, weighted=weighted, where=where, field=field, path=at)
            if any(i.name == spec.name for i in built):
                raise invalid(f"{where}: two {kind}s named {spec.name!r}; give one a 'name' of its own", field,
                              _at(at, "name"))
            built.append(self.build(kind, spec, env, where=where, field=field, path=at))
        return built

    def _check(self, subject: object, kind: str, type_name: str) -> None:
        interface = self._kinds[kind]
        try:
            check_hooks(subject, (interface, *self._hooks))
        except TypeError as err:
            raise TypeError(f"{kind} type {type_name!r}: {err}") from None
        missing = [m for m in protocol_members(interface) if not hasattr(subject, m)]
        if missing and not isinstance(subject, type):
            raise TypeError(f"{kind} type {type_name!r}: {type(subject).__qualname__} is no {interface.__name__}"
                            f" (missing {', '.join(missing)})")


def weighted_sum(keys: Sequence[str], scored: Iterable[tuple[float, Mapping[str, float]]]) -> dict[str, float]:
    """The scorer convention of both frameworks: a scorer gives each candidate (by key) a score in [0, 1], higher
    is better (clamped to that range; a candidate it leaves out scores 0); the total is the weighted sum."""
    totals = dict.fromkeys(keys, 0.0)
    for weight, scores in scored:
        for key in totals:
            totals[key] += weight * min(1.0, max(0.0, scores.get(key, 0.0)))
    return totals
