"""Where the CLI keeps a local cluster's files, and how it finds a running one."""

from __future__ import annotations

import json
import os
import pathlib

from clowder_common.processes import pid_alive

CLUSTER_FILE = "cluster.json"


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


def write_cluster(data_dir: pathlib.Path, info: dict) -> None:
    path = data_dir / CLUSTER_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(info, indent=2) + "\n")
    os.replace(tmp, path)


def remove_cluster(data_dir: pathlib.Path) -> None:
    (data_dir / CLUSTER_FILE).unlink(missing_ok=True)
