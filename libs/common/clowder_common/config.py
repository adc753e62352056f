"""Typed configuration: frozen dataclasses filled from a YAML file, then the environment."""

from __future__ import annotations

import dataclasses
import os
import pathlib
import types
import typing
from typing import Any, Mapping, TypeVar

import yaml

from clowder_common.errors import InvalidArgument

T = TypeVar("T")

ENV_PREFIX = "CLOWDER_"


def _coerce(name: str, raw: Any, kind: Any) -> Any:
    """Turn a YAML or environment value into the field's declared type."""
    origin = typing.get_origin(kind)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(kind) if a is not type(None)]
        if raw is None or raw == "":
            return None
        return _coerce(name, raw, args[0])
    if kind is bool:
        if isinstance(raw, bool):
            return raw
        text = str(raw).strip().lower()
        if text in ("1", "true", "yes", "on"):
            return True
        if text in ("0", "false", "no", "off"):
            return False
        raise InvalidArgument(f"config {name}: expected a boolean, got {raw!r}", field=name)
    if kind in (int, float):
        try:
            return kind(raw)
        except (TypeError, ValueError):
            raise InvalidArgument(f"config {name}: expected {kind.__name__}, got {raw!r}", field=name) from None
    if kind is str:
        return str(raw)
    if origin in (tuple, list):
        items = raw.split(",") if isinstance(raw, str) else list(raw)
        return tuple(str(i).strip() for i in items if str(i).strip())
    if origin in (dict, Mapping) or kind is dict:
        if isinstance(raw, str):
            pairs = (p.split("=", 1) for p in raw.split(",") if "=" in p)
            return {k.strip(): v.strip() for k, v in pairs}
        return {str(k): str(v) for k, v in dict(raw).items()}
    return raw


def load_config(
    cls: type[T],
    path: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> T:
    """Build `cls` from defaults < YAML file < environment (CLOWDER_<FIELD>) < overrides.

    Unknown keys in the file are an error, so a typo never silently keeps a default.
    """
    env = os.environ if env is None else env
    values: dict[str, Any] = {}
    if path:
        text = pathlib.Path(path).read_text()
        data = yaml.safe_load(text) or {}
        if not isinstance(data, dict):
            raise InvalidArgument(f"config file {path}: expected a mapping at the top level")
        values.update(data)
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = set(values) - names
    if unknown:
        raise InvalidArgument(f"config file {path}: unknown keys {sorted(unknown)}")
    for name in names:
        key = ENV_PREFIX + name.upper()
        if key in env:
            values[name] = env[key]
    for name, value in (overrides or {}).items():
        if value is not None:
            values[name] = value
    typed = {name: _coerce(name, raw, hints[name]) for name, raw in values.items()}
    return cls(**typed)


@dataclasses.dataclass(frozen=True)
class EtcdConfig:
    """Where cluster state lives."""

    # Comma-separated host:port list; the first reachable one is used.
    etcd_endpoints: tuple[str, ...] = ("127.0.0.1:2379",)
    # Every key Clowder writes starts with this.
    etcd_prefix: str = "/clowder/"
