"""Where the CLI keeps a local cluster's files, and how it finds a running one."""

from __future__ import annotations

import json
import os
import pathlib

from clowder_common.errors import NotFound
from clowder_common.processes import pid_alive

CLUSTER_FILE = "cluster.json"
# Written by `clowder up`'s supervisor whenever a component changes state; read by `clowder status`.
SUPERVISOR_FILE = "supervisor.json"


def default_data_dir() -> pathlib.Path:
    explicit = os.environ.get("CLOWDER_DATA_DIR")
    if explicit:
        return pathlib.Path(explicit).expanduser()
    base = os.environ.get("XDG_DATA_HOME") or os.path.expanduser("~/.local/share")
    return pathlib.Path(base) / "clowder"


def read_cluster(data_dir: pathlib.Path) -> dict | None:
    """The running local cluster's addresses, or None when no `clowder up` is alive."""
    path = data_dir / CLUSTER_FILE
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not pid_alive(int(info.get("pid", 0))):
        return None
    return info


def local_address(data_dir: pathlib.Path, component: str, flag: str) -> str:
    """The address `component` (a key of cluster.json) has in the local cluster; NotFound names `flag`."""
    cluster = read_cluster(data_dir)
    if cluster is None or not cluster.get(component):
        raise NotFound(f"no local cluster is running from {data_dir}: run `clowder up` (or pass {flag})")
    return cluster[component]


def source_url(value: str) -> str:
    """A URL as it is; a local file as its file:// URL (what storage nodes on this machine can read)."""
    if "://" in value:
        return value
    path = pathlib.Path(value).expanduser().resolve()
    if not path.is_file():
        raise NotFound(f"{value} is neither a URL nor a file")
    return path.as_uri()


def _write_atomic(path: pathlib.Path, info: dict) -> None:
    """Readers see the old file or the new one, never half of one."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(info, indent=2) + "\n")
    os.replace(tmp, path)


def write_cluster(data_dir: pathlib.Path, info: dict) -> None:
    _write_atomic(data_dir / CLUSTER_FILE, info)


def remove_cluster(data_dir: pathlib.Path) -> None:
    (data_dir / CLUSTER_FILE).unlink(missing_ok=True)
    (data_dir / SUPERVISOR_FILE).unlink(missing_ok=True)


def write_supervisor_state(data_dir: pathlib.Path, state: dict) -> None:
    _write_atomic(data_dir / SUPERVISOR_FILE, state)


def read_supervisor_state(data_dir: pathlib.Path) -> dict | None:
    """The supervisor's last written state, or None when no `clowder up` runs from data_dir (also while starting)."""
    try:
        state = json.loads((data_dir / SUPERVISOR_FILE).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(state, dict) or not pid_alive(int(state.get("pid", 0))):
        return None
    return state
