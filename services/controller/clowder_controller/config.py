"""Controller configuration."""

from __future__ import annotations

import dataclasses
import os

from clowder_common.config import EtcdConfig


@dataclasses.dataclass(frozen=True)
class ControllerConfig(EtcdConfig):
    # gRPC address of the control-plane API (ImageService, DeploymentService, NodeService).
    listen: str = "127.0.0.1:3092"
    # Runtime logs go under <data_dir>/logs.
    data_dir: str = os.path.expanduser("~/.local/share/clowder/controller")
    # Full reconcile pass at least this often, even without etcd events.
    resync_interval_s: float = 5.0
    # llama.cpp threads per runtime; 0 shares the node's cores among the replicas placed on it.
    runtime_threads: int = 0
    # A runtime that has not registered its endpoint after this long is restarted.
    runtime_start_timeout_s: float = 180.0
    # How long a stopping runtime may drain before SIGKILL.
    runtime_stop_grace_s: float = 15.0
    # Address the runtimes bind (port 0: any free port, reported through etcd).
    runtime_listen: str = "127.0.0.1:0"
    # Most replicas one deployment may ask for.
    max_replicas: int = 64
