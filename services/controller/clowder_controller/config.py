"""Controller configuration."""

from __future__ import annotations

import dataclasses
import os

from clowder_common.config import EtcdConfig
from clowder_common.security import SecurityConfig
from clowder_common.runtime_settings import RuntimeSettings


@dataclasses.dataclass(frozen=True)
class ControllerConfig(EtcdConfig, SecurityConfig):
    # gRPC address of the control-plane API (ImageService, DeploymentService, NodeService).
    listen: str = "127.0.0.1:3092"
    # Runtime logs go under <data_dir>/logs.
    data_dir: str = os.path.expanduser("~/.local/share/clowder/controller")
    # Full reconcile pass at least this often, even without etcd events.
    resync_interval_s: float = 5.0
    # Runtime settings for replicas whose deployment and aimage set none (clowder_common.runtime_settings has
    # the defaults and why). llama.cpp threads per runtime; 0 shares the node's cores among the replicas
    # placed on it.
    runtime_threads: int = 0
    # Slots (sequences decoded together), context per slot, prompt tokens per step; 0: the runtime's default.
    runtime_slots: int = 0
    runtime_context_size: int = 0
    runtime_batch_size: int = 0
    # A runtime that has not registered its endpoint after this long is restarted (timed, like the grace below,
    # only while etcd answers: an etcd outage never restarts a runtime whose process runs).
    runtime_start_timeout_s: float = 180.0
    # A node missing from etcd (its storage lease gone) is declared lost, and its replicas placed elsewhere, only
    # after it has been missing this long counted over time during which etcd answered this controller; a ready
    # replica whose endpoint vanished is marked unready after the same. Three lease TTLs (storage: 10 s) and then
    # some: a node or runtime whose lease expired during an etcd outage re-registers within a second or two of
    # etcd answering again, long before this.
    node_lost_grace_s: float = 30.0
    # How long a stopping runtime may drain before SIGKILL.
    runtime_stop_grace_s: float = 15.0
    # Address the runtimes bind (port 0: any free port, reported through etcd).
    runtime_listen: str = "127.0.0.1:0"
    # Local launcher, other nodes: node name -> command prefix (flag --node-exec NODE=COMMAND). A runtime
    # placed on that node runs as shlex.split(COMMAND) + its argv (e.g. "ip netns exec clowder-n1", or ssh)
    # and listens on the host of the node's storage address (port 0) instead of runtime_listen.
    node_exec: dict[str, str] = dataclasses.field(default_factory=dict)
    # Most replicas one deployment may ask for.
    max_replicas: int = 64
    # Placement profile: "spread" (emptiest nodes first) or "binpack" (fullest node that fits first).
    placement: str = "spread"
    # Weight of preferring nodes that already hold the model (the fullness scorer weighs 1).
    locality_weight: float = 0.3
    # Leader lease TTL: a killed leader is replaced within about this long.
    leader_ttl_s: int = 10
    # Autoscaler pass interval (load changes also wake it at once).
    autoscale_interval_s: float = 1.0
    # Scale up to the lowest recommendation of this window (0: at once) ...
    scale_up_window_s: float = 0.0
    # ... and down to the highest of this one, against flapping.
    scale_down_window_s: float = 30.0
    # How runtimes start: "local" (child processes here) or "kubernetes" (a pod per replica; in-cluster
    # credentials, else ~/.kube/config).
    launcher: str = "local"
    kubernetes_namespace: str = "clowder"
    kubernetes_runtime_image: str = "ghcr.io/clowder/clowder:latest"
    # The storage DaemonSet's hostPath, mounted read-only into runtime pods.
    kubernetes_store_path: str = "/var/lib/clowder/storage"
    # Secret (and its key) with the admin token, and the ConfigMap that owns runtime pods.
    kubernetes_token_secret: str = "clowder-admin-token"
    kubernetes_token_key: str = "token"
    # Secret (and its key) with the cluster's service credential that runtime pods demand of their callers.
    kubernetes_service_token_secret: str = "clowder-service-token"
    kubernetes_service_token_key: str = "token"
    kubernetes_owner_configmap: str = "clowder-controller"
    # Extra labels of runtime pods, "name=value,name=value" (the install's, for its network policies).
    kubernetes_pod_labels: str = ""
    # Secrets mounted into runtime pods for TLS (tls.crt, tls.key, ca.crt) and etcd client TLS; empty: none.
    # Runtimes demand client certificates when this controller's own tls_client_auth is set.
    kubernetes_tls_secret: str = ""
    kubernetes_etcd_tls_secret: str = ""

    @property
    def runtime_settings(self) -> RuntimeSettings:
        return RuntimeSettings(slots=self.runtime_slots, threads=self.runtime_threads,
                               context_size=self.runtime_context_size, batch_size=self.runtime_batch_size)
