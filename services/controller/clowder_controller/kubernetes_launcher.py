"""Runtimes as Kubernetes pods: one pod per replica pinned to its node, the node's store mounted read-only.

The kubernetes client is synchronous, so every API call runs on a small
dedicated executor. `status()` must answer without I/O (the reconciler calls it
inside a pass), so a background task lists this controller's pods by label
every few seconds, the way an informer would, and status reads that copy.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import hashlib
import logging
import re
import time
from typing import Any

from google.protobuf import json_format

from clowder.controller.v1 import resources_pb2
from clowder_common.auth import TOKEN_ENV
from clowder_common.security import SERVICE_TOKEN_ENV
from clowder_controller.config import ControllerConfig
from clowder_controller.launcher import RuntimeSpec, RuntimeState, RuntimeStatus

log = logging.getLogger(__name__)

MANAGED_BY = "clowder-controller"
LABEL_DEPLOYMENT = "clowder.dev/deployment"
LABEL_REPLICA = "clowder.dev/replica"
LABEL_MANAGED = "app.kubernetes.io/managed-by"
# A pod created this recently may be missing from the last listing without having died.
CREATE_GRACE_S = 30.0
API_TIMEOUT_S = 10


@dataclasses.dataclass(frozen=True)
class KubernetesSettings:
    namespace: str = "clowder"
    # Container image holding the Clowder runtime (python -m clowder_runtime).
    runtime_image: str = "ghcr.io/clowder/clowder:latest"
    # Port the runtime serves gRPC (and its health service) on inside the pod.
    runtime_port: int = 3094
    # The node store's directory on every node (storage DaemonSet hostPath), mounted read-only at the same path.
    store_path: str = "/var/lib/clowder/storage"
    # Secret holding the admin token under `token_key`: never inlined in the pod spec.
    token_secret: str = "clowder-admin-token"
    token_key: str = "token"
    # Secret holding the cluster's service credential: a runtime takes calls only from holders (the balancers).
    service_token_secret: str = "clowder-service-token"
    service_token_key: str = "token"
    # ConfigMap owned by the controller's install; pods are owned by it, so uninstalling removes them.
    owner_configmap: str = "clowder-controller"
    # Labels every runtime pod carries besides Clowder's own (the install's, so its network policies select
    # runtime pods: balancers may call them, they may call storage and etcd).
    pod_labels: tuple[tuple[str, str], ...] = ()
    # Secret with tls.crt, tls.key and ca.crt (the chart's `tls.existingSecret`): runtimes serve TLS only, and
    # demand client certificates when tls_client_auth is set. Empty: plaintext.
    tls_secret: str = ""
    tls_client_auth: bool = False
    # Secret with etcd's ca.crt and this install's client tls.crt/tls.key (the chart's `etcdTls.existingSecret`).
    etcd_tls_secret: str = ""
    # Pod listing interval for status().
    resync_s: float = 5.0


def _dns_label(value: str) -> str:
    return re.sub(r"[^a-z0-9-]", "-", value.lower()).strip("-")


def pod_name(deployment: str, replica_id: str) -> str:
    """A valid DNS-1123 label, unique per replica even after shortening."""
    name = f"clowder-{_dns_label(deployment)}-{_dns_label(replica_id)}"
    if len(name) <= 63:
        return name
    digest = hashlib.sha256(f"{deployment}/{replica_id}".encode()).hexdigest()[:8]
    return f"{name[:54].rstrip('-')}-{digest}"


def parse_pod_labels(value: str) -> tuple[tuple[str, str], ...]:
    """`name=value,name=value` (the controller's kubernetes_pod_labels setting) as pairs."""
    pairs = []
    for item in filter(None, (part.strip() for part in value.split(","))):
        name, sep, label = item.partition("=")
        if not sep or not name.strip():
            raise ValueError(f"kubernetes_pod_labels: {item!r} is not name=value")
        pairs.append((name.strip(), label.strip()))
    return tuple(pairs)


def kubernetes_settings(config: ControllerConfig) -> KubernetesSettings:
    """The launcher's settings from the controller's configuration (CLOWDER_KUBERNETES_* in the manifests)."""
    return KubernetesSettings(
        namespace=config.kubernetes_namespace, runtime_image=config.kubernetes_runtime_image,
        store_path=config.kubernetes_store_path, token_secret=config.kubernetes_token_secret,
        token_key=config.kubernetes_token_key, service_token_secret=config.kubernetes_service_token_secret,
        service_token_key=config.kubernetes_service_token_key,
        owner_configmap=config.kubernetes_owner_configmap, pod_labels=parse_pod_labels(config.kubernetes_pod_labels),
        tls_secret=config.kubernetes_tls_secret, tls_client_auth=config.tls_client_auth,
        etcd_tls_secret=config.kubernetes_etcd_tls_secret,
    )


def _secret_files(settings: KubernetesSettings) -> tuple[list[dict[str, Any]], list[dict[str, Any]],
                                                           list[dict[str, Any]]]:
    """Env, mounts and volumes for the TLS Secrets: paths by environment, the material only in files."""
    env: list[dict[str, Any]] = []
    mounts: list[dict[str, Any]] = []
    volumes: list[dict[str, Any]] = []
    for volume, secret, prefix in (("tls", settings.tls_secret, "CLOWDER_TLS"),
                                   ("etcd-tls", settings.etcd_tls_secret, "CLOWDER_ETCD")):
        if not secret:
            continue
        path = f"/etc/clowder/{volume}"
        env += [{"name": f"{prefix}_CERT_FILE", "value": f"{path}/tls.crt"},
                {"name": f"{prefix}_KEY_FILE", "value": f"{path}/tls.key"},
                {"name": f"{prefix}_CA_FILE", "value": f"{path}/ca.crt"}]
        mounts.append({"name": volume, "mountPath": path, "readOnly": True})
        volumes.append({"name": volume, "secret": {"secretName": secret, "defaultMode": 0o400}})
    if settings.tls_secret:
        env.append({"name": "CLOWDER_TLS_CLIENT_AUTH", "value": "true" if settings.tls_client_auth else "false"})
    return env, mounts, volumes


def build_pod(spec: RuntimeSpec, settings: KubernetesSettings, etcd_endpoints: tuple[str, ...], etcd_prefix: str,
              owner: dict[str, str]) -> dict[str, Any]:
    """The pod for one replica, as the JSON the API server takes."""
    port = settings.runtime_port
    tls_env, tls_mounts, tls_volumes = _secret_files(settings)
    args = [
        "-m", "clowder_runtime",
        "--deployment", spec.deployment,
        "--replica-id", spec.replica_id,
        "--node", spec.node,
        "--digest", spec.digest,
        "--storage", spec.storage_address,
        "--listen", f"0.0.0.0:{port}",
        # Kubernetes expands $(POD_IP) from the env below: balancers dial the pod directly.
        "--advertise-host", "$(POD_IP)",
        *spec.settings_args(),
        "--etcd-endpoints", ",".join(etcd_endpoints),
        "--etcd-prefix", etcd_prefix,
        "--image-config", json_format.MessageToJson(spec.configuration, indent=None),
    ]
    # Kubernetes' gRPC probes cannot speak TLS: a TLS runtime is probed by TCP (ready once it listens, which
    # it does only after loading its model).
    probe: dict[str, Any] = {"tcpSocket": {"port": port}} if settings.tls_secret else {
        "grpc": {"port": port, "service": ""}}
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": pod_name(spec.deployment, spec.replica_id),
            "namespace": settings.namespace,
            "labels": {
                "app.kubernetes.io/name": "clowder-runtime",
                **dict(settings.pod_labels),
                LABEL_MANAGED: MANAGED_BY,
                LABEL_DEPLOYMENT: _dns_label(spec.deployment)[:63],
                LABEL_REPLICA: _dns_label(spec.replica_id)[:63],
            },
            "ownerReferences": [{
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "name": owner["name"],
                "uid": owner["uid"],
                "controller": True,
                "blockOwnerDeletion": True,
            }],
        },
        "spec": {
            # Pinned: the scheduler already chose the node (and its store holds the model).
            "nodeName": spec.node,
            "restartPolicy": "Never",
            "containers": [{
                "name": "runtime",
                "image": settings.runtime_image,
                "command": ["python"],
                "args": args,
                "ports": [{"name": "grpc", "containerPort": port, "protocol": "TCP"}],
                "env": [
                    {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
                    {"name": TOKEN_ENV, "valueFrom": {"secretKeyRef": {"name": settings.token_secret,
                                                                       "key": settings.token_key}}},
                    {"name": SERVICE_TOKEN_ENV, "valueFrom": {"secretKeyRef": {"name": settings.service_token_secret,
                                                                               "key": settings.service_token_key}}},
                    *tls_env,
                ],
                "resources": {"requests": {"cpu": str(spec.threads)}},
                # Ready once the runtime's gRPC health says SERVING (model loaded).
                "readinessProbe": {**probe, "periodSeconds": 2, "failureThreshold": 3},
                "startupProbe": {**probe, "periodSeconds": 2, "failureThreshold": 90},
                "volumeMounts": [{"name": "models", "mountPath": settings.store_path, "readOnly": True}, *tls_mounts],
                "securityContext": {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True},
            }],
            "volumes": [{"name": "models", "hostPath": {"path": settings.store_path, "type": "Directory"}},
                        *tls_volumes],
            "terminationGracePeriodSeconds": 30,
        },
    }


class KubernetesLauncher:
    """The Launcher interface over the Kubernetes API (a `kubernetes.client.ApiClient`)."""

    def __init__(self, api_client, settings: KubernetesSettings, etcd_endpoints: tuple[str, ...],
                 etcd_prefix: str) -> None:
        from kubernetes import client  # imported here: only this engine needs it

        self._core = client.CoreV1Api(api_client)
        self._api_client = api_client
        self._settings = settings
        self._etcd_endpoints = etcd_endpoints
        self._etcd_prefix = etcd_prefix
        self._executor = concurrent.futures.ThreadPoolExecutor(4, thread_name_prefix="kubernetes")
        self._owner: dict[str, str] | None = None
        # Pod name -> (phase, exit code) from the last listing, and when we created pods ourselves.
        self._pods: dict[str, tuple[str, int | None]] = {}
        self._created: dict[str, float] = {}
        self._listed_at = 0.0
        self._task: asyncio.Task | None = None

    async def _call(self, fn, *args, **kwargs):
        loop = asyncio.get_running_loop()
        kwargs.setdefault("_request_timeout", API_TIMEOUT_S)
        return await loop.run_in_executor(self._executor, lambda: fn(*args, **kwargs))

    async def start_watching(self) -> None:
        """Resolve the owner object and begin listing pods; call once before the first start()."""
        await self._owner_ref()
        await self.refresh()
        if self._task is None:
            self._task = asyncio.create_task(self._resync(), name="kubernetes-pods")

    async def _owner_ref(self) -> dict[str, str]:
        if self._owner is None:
            cm = await self._call(self._core.read_namespaced_config_map, self._settings.owner_configmap,
                                  self._settings.namespace)
            self._owner = {"name": cm.metadata.name, "uid": cm.metadata.uid}
        return self._owner

    async def refresh(self) -> None:
        pods = await self._call(self._core.list_namespaced_pod, self._settings.namespace,
                                label_selector=f"{LABEL_MANAGED}={MANAGED_BY}")
        seen = {}
        for pod in pods.items:
            code = None
            for status in (pod.status.container_statuses or []) if pod.status else []:
                if status.state and status.state.terminated:
                    code = status.state.terminated.exit_code
            seen[pod.metadata.name] = ((pod.status.phase if pod.status else None) or "Pending", code)
        self._pods = seen
        self._listed_at = time.monotonic()

    async def _resync(self) -> None:
        while True:
            await asyncio.sleep(self._settings.resync_s)
            try:
                await self.refresh()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # API server away: keep the last view, try again
                log.warning("listing runtime pods failed: %s", exc)

    def pod_for(self, spec: RuntimeSpec) -> dict[str, Any]:
        if self._owner is None:
            raise RuntimeError("start_watching() must run before pods are created")
        return build_pod(spec, self._settings, self._etcd_endpoints, self._etcd_prefix, self._owner)

    async def start(self, spec: RuntimeSpec) -> int:
        await self._owner_ref()
        name = pod_name(spec.deployment, spec.replica_id)
        await self._delete(name, grace=0)
        await self._call(self._core.create_namespaced_pod, self._settings.namespace, self.pod_for(spec))
        self._created[name] = time.monotonic()
        self._pods[name] = ("Pending", None)
        log.info("created pod %s for %s/%s on %s", name, spec.deployment, spec.replica_id, spec.node)
        # Pods have no process id the controller could use.
        return 0

    def status(self, replica: resources_pb2.Replica) -> RuntimeStatus:
        name = pod_name(replica.deployment, replica.id)
        found = self._pods.get(name)
        if found is None:
            created = self._created.get(name)
            if created is not None and time.monotonic() - created < CREATE_GRACE_S:
                return RuntimeStatus(RuntimeState.RUNNING)
            return RuntimeStatus(RuntimeState.EXITED)
        phase, code = found
        if phase in ("Succeeded", "Failed"):
            return RuntimeStatus(RuntimeState.EXITED, code)
        return RuntimeStatus(RuntimeState.RUNNING)

    async def _delete(self, name: str, grace: float) -> bool:
        from kubernetes.client.exceptions import ApiException

        try:
            await self._call(self._core.delete_namespaced_pod, name, self._settings.namespace,
                             grace_period_seconds=int(grace))
        except ApiException as exc:
            if exc.status == 404:
                return False
            raise
        return True

    async def stop(self, replica: resources_pb2.Replica, grace: float) -> None:
        name = pod_name(replica.deployment, replica.id)
        if await self._delete(name, grace):
            log.info("deleted pod %s", name)
        self._pods.pop(name, None)
        self._created.pop(name, None)

    async def stop_all(self, grace: float) -> None:
        """Pods outlive a controller (the next leader adopts them): only stop watching."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self._executor.shutdown(wait=False, cancel_futures=True)
