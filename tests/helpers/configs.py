"""Service configs as tests use them: loopback port 0, a data dir of the test's, the shared etcd under a prefix.

Only where a service runs is set here (and the controller's quick resync); every other setting a test needs is a
keyword override at the call, so what a test depends on stays in the test.
"""

from __future__ import annotations

import pathlib
from typing import Any

from clowder_balancer.config import BalancerConfig
from clowder_controller.config import ControllerConfig
from clowder_storage.config import StorageConfig


def controller_config(etcd_endpoint: str, prefix: str, data_dir: pathlib.Path | str,
                      **overrides: Any) -> ControllerConfig:
    """A controller that resyncs every 0.5 s, so a test sees it converge within seconds."""
    settings: dict[str, Any] = dict(listen="127.0.0.1:0", data_dir=str(data_dir), etcd_endpoints=(etcd_endpoint,),
                                    etcd_prefix=prefix, resync_interval_s=0.5)
    settings.update(overrides)
    return ControllerConfig(**settings)


def storage_config(etcd_endpoint: str, prefix: str, data_dir: pathlib.Path | str, node_name: str,
                   **overrides: Any) -> StorageConfig:
    settings: dict[str, Any] = dict(listen="127.0.0.1:0", data_dir=str(data_dir), node_name=node_name,
                                    etcd_endpoints=(etcd_endpoint,), etcd_prefix=prefix)
    settings.update(overrides)
    return StorageConfig(**settings)


def balancer_config(etcd_endpoint: str, prefix: str, **overrides: Any) -> BalancerConfig:
    """A balancer that waits 2 s for a ready replica and drains for 3 s unless told otherwise."""
    settings: dict[str, Any] = dict(etcd_endpoints=(etcd_endpoint,), etcd_prefix=prefix, http_listen="127.0.0.1:0",
                                    grpc_listen="127.0.0.1:0", ready_timeout_s=2.0, drain_grace_s=3.0)
    settings.update(overrides)
    return BalancerConfig(**settings)
