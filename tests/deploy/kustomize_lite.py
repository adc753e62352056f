"""The part of `kustomize build` that deploy/k8s uses, for tests on machines without the kustomize binary.

Implements: resources (files and directories), namespace, images (newName/newTag), and patches that are
either JSON 6902 operation lists with a target, or strategic-merge patches of the `$patch: delete` form.
Anything else in a kustomization raises, so a manifest never silently relies on an unimplemented feature.
"""

from __future__ import annotations

import copy
import pathlib
from typing import Any

import yaml

SUPPORTED_KEYS = {"apiVersion", "kind", "resources", "namespace", "images", "patches"}
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition", "PersistentVolume",
                  "StorageClass", "PriorityClass"}
POD_TEMPLATES = {"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"}


def load_documents(text: str) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(text) if doc]


def build(directory: pathlib.Path) -> list[dict[str, Any]]:
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    unknown = set(kustomization) - SUPPORTED_KEYS
    if unknown:
        raise NotImplementedError(f"{directory}: kustomization keys {sorted(unknown)} are not implemented here")
    objects: list[dict[str, Any]] = []
    for entry in kustomization.get("resources", []):
        target = (directory / entry).resolve()
        objects += build(target) if target.is_dir() else load_documents(target.read_text())
    for patch in kustomization.get("patches", []):
        objects = _apply_patch(directory, patch, objects)
    for image in kustomization.get("images", []):
        _set_image(objects, image)
    if "namespace" in kustomization:
        _set_namespace(objects, kustomization["namespace"])
    return objects


def _apply_patch(directory: pathlib.Path, patch: dict[str, Any], objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    text = (directory / patch["path"]).read_text() if "path" in patch else patch["patch"]
    parsed = yaml.safe_load(text)
    if isinstance(parsed, list):
        if "target" not in patch:
            raise ValueError("a JSON 6902 patch needs a target")
        matched = [o for o in objects if _matches(o, patch["target"])]
        if not matched:
            raise ValueError(f"patch target {patch['target']} matches nothing")
        for obj in matched:
            for operation in parsed:
                _json_patch(obj, operation)
        return objects
    if isinstance(parsed, dict) and parsed.get("$patch") == "delete":
        selector = {"kind": parsed["kind"], "name": parsed["metadata"]["name"]}
        kept = [o for o in objects if not (_matches(o, selector) and o["apiVersion"] == parsed["apiVersion"])]
        if len(kept) == len(objects):
            raise ValueError(f"delete patch {selector} matches nothing")
        return kept
    raise NotImplementedError("only JSON 6902 patches and `$patch: delete` are implemented here")


def _matches(obj: dict[str, Any], target: dict[str, Any]) -> bool:
    for key in ("kind", "name", "namespace"):
        if key in target:
            actual = obj.get("kind") if key == "kind" else obj.get("metadata", {}).get(key)
            if actual != target[key]:
                return False
    return True


def _pointer(path: str) -> list[str]:
    if not path.startswith("/"):
        raise ValueError(f"bad JSON pointer {path!r}")
    return [part.replace("~1", "/").replace("~0", "~") for part in path[1:].split("/")]


def _json_patch(obj: dict[str, Any], operation: dict[str, Any]) -> None:
    *parents, last = _pointer(operation["path"])
    node: Any = obj
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node[part]
    op = operation["op"]
    if op == "replace":
        if isinstance(node, list):
            node[int(last)] = copy.deepcopy(operation["value"])
        else:
            if last not in node:
                raise KeyError(f"replace of missing {operation['path']}")
            node[last] = copy.deepcopy(operation["value"])
    elif op == "add":
        if isinstance(node, list):
            node.insert(len(node) if last == "-" else int(last), copy.deepcopy(operation["value"]))
        else:
            node[last] = copy.deepcopy(operation["value"])
    elif op == "remove":
        del node[int(last) if isinstance(node, list) else last]
    else:
        raise NotImplementedError(f"JSON patch op {op!r} is not implemented here")


def _set_image(objects: list[dict[str, Any]], image: dict[str, str]) -> None:
    for obj in objects:
        if obj["kind"] not in POD_TEMPLATES:
            continue
        spec = obj["spec"]["template"]["spec"]
        for container in spec.get("containers", []) + spec.get("initContainers", []):
            name = container["image"].split("@")[0].rsplit(":", 1)[0] if ":" in container["image"].split("/")[-1] \
                else container["image"]
            if name == image["name"]:
                new = image.get("newName", name)
                container["image"] = f"{new}:{image['newTag']}" if "newTag" in image else new


def _set_namespace(objects: list[dict[str, Any]], namespace: str) -> None:
    for obj in objects:
        if obj["kind"] == "Namespace":
            obj["metadata"]["name"] = namespace
            continue
        if obj["kind"] in CLUSTER_SCOPED:
            continue
        obj["metadata"]["namespace"] = namespace
        if obj["kind"] in ("RoleBinding", "ClusterRoleBinding"):
            for subject in obj.get("subjects", []):
                if subject.get("kind") == "ServiceAccount":
                    subject.setdefault("namespace", namespace)
