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


def documents(text: str) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(text) if doc]
