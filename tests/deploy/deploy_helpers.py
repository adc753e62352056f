"""Shared checks of rendered Kubernetes objects: strict schema validation and the facts every object set must hold."""

from __future__ import annotations

import importlib.util
import pathlib
from typing import Any

import kubernetes_validate
import yaml

REPO = pathlib.Path(__file__).resolve().parents[2]
CHART = REPO / "deploy" / "helm" / "clowder"
KUSTOMIZE = REPO / "deploy" / "k8s"
KUBE_VERSION = "1.35"
WORKLOADS = ("Deployment", "StatefulSet", "DaemonSet")


def validate_all(objects: list[dict[str, Any]]) -> None:
    assert objects
    for obj in objects:
        try:
            kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)
        except kubernetes_validate.ValidationError as err:
            raise AssertionError(f"{obj['kind']}/{obj['metadata']['name']}: {err.message} at "
                                 f"{'.'.join(map(str, err.path))}") from None


def by_kind(objects: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {o["metadata"]["name"]: o for o in objects if o["kind"] == kind}


def containers(obj: dict[str, Any]) -> list[dict[str, Any]]:
    spec = obj["spec"]["template"]["spec"]
    return spec.get("initContainers", []) + spec["containers"]


def assert_clowder_invariants(objects: list[dict[str, Any]]) -> None:
    """Facts both the chart and the kustomize base must hold, whatever the values."""
    assert not [o for o in objects if o["kind"] == "Secret"], "the admin token is the user's Secret, never ours"
    for obj in objects:
        if obj["kind"] not in WORKLOADS:
            continue
        for container in obj["spec"]["template"]["spec"]["containers"]:
            command = container.get("command", [])
            if command[:2] == ["python", "-m"]:
                # The entry point must be a module of this project.
                assert importlib.util.find_spec(command[2]) is not None, command
                port = container["ports"][0]["containerPort"]
                assert container["livenessProbe"]["grpc"]["port"] in (port, container["ports"][-1]["containerPort"])
                assert "grpc" in container["readinessProbe"]
            for env in container.get("env", []):
                if env["name"] == "CLOWDER_ADMIN_TOKEN":
                    assert "value" not in env and env["valueFrom"]["secretKeyRef"]["name"]
            sc = container.get("securityContext", {})
            assert sc.get("allowPrivilegeEscalation") is False and sc.get("readOnlyRootFilesystem") is True


def runtime_pod(objects: list[dict[str, Any]]) -> dict[str, Any]:
    """The pod the controller of `objects` would create for a replica, from the settings its manifest gives it."""
    from clowder.controller.v1 import resources_pb2
    from clowder_common.config import load_config
    from clowder_controller.config import ControllerConfig
    from clowder_controller.kubernetes_launcher import build_pod, kubernetes_settings
    from clowder_controller.launcher import RuntimeSpec

    (controller,) = [c for o in objects if o["kind"] == "Deployment" for c in containers(o)
                     if c.get("command", [])[2:3] == ["clowder_controller"]]
    env = {e["name"]: e.get("value", "") for e in controller["env"]}
    # Values from fieldRefs and Secrets are the cluster's at run time; their names are what the test can see.
    env["CLOWDER_KUBERNETES_NAMESPACE"] = "clowder"
    config = load_config(ControllerConfig, env={k: v for k, v in env.items() if v})
    assert config.launcher == "kubernetes", "runtimes must run as pods, not inside the controller's pod"
    settings = kubernetes_settings(config)
    assert settings.runtime_image == controller["image"], "runtime pods run the image the controller runs"
    assert settings.owner_configmap in by_kind(objects, "ConfigMap"), "the owner of runtime pods must exist"
    spec = RuntimeSpec(deployment="smol", replica_id="1a2b3c4d-0", node="worker-1", digest="sha256:" + "a" * 64,
                       storage_address="10.0.0.5:3093", configuration=resources_pb2.ImageConfiguration(), threads=2)
    pod = build_pod(spec, settings, ("etcd:2379",), "/clowder/", {"name": settings.owner_configmap, "uid": "u-1"})
    validate_all([pod])
    storage = [c for o in objects if o["kind"] == "DaemonSet" for c in containers(o)
               if c.get("command", [])[2:3] == ["clowder_storage"]]
    store = next(v["hostPath"]["path"] for o in objects if o["kind"] == "DaemonSet" for v in
                 o["spec"]["template"]["spec"]["volumes"] if "hostPath" in v)
    assert storage and settings.store_path == store, "runtime pods mount the store storage writes"
    return pod


def _selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for expression in selector.get("matchExpressions", []):
        assert expression["operator"] == "In", expression
        if labels.get(expression["key"]) not in expression["values"]:
            return False
    return True


def assert_runtime_pods_are_reachable(objects: list[dict[str, Any]]) -> None:
    """Network policies select runtime pods as runtimes: balancers may call them, they may call storage."""
    labels = runtime_pod(objects)["metadata"]["labels"]
    policies = by_kind(objects, "NetworkPolicy")
    assert policies, "network policies are on by default"
    selected = [p for p in policies.values() if _selects(p["spec"]["podSelector"], labels)]
    assert [p["metadata"]["name"] for p in selected] == [n for n in policies if n.endswith("-runtime")]
    storage = next(p for n, p in policies.items() if n.endswith("-storage"))
    assert any(_selects(peer["podSelector"], labels) for rule in storage["spec"]["ingress"]
               for peer in rule.get("from", []) if "podSelector" in peer), "runtimes must reach their storage"


def documents(text: str) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(text) if doc]
