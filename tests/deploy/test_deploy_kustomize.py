"""deploy/k8s: the kustomize base and the external-etcd overlay build and validate strictly against Kubernetes 1.35."""

from __future__ import annotations

import importlib.util
import re

import pytest

from deploy_helpers import KUSTOMIZE, REPO, assert_clowder_invariants, assert_runtime_pods_are_reachable, by_kind, containers, validate_all
from kustomize_lite import build

pytestmark = pytest.mark.unit

EXTERNAL = "etcd-0.etcd.infra.svc:2379,etcd-1.etcd.infra.svc:2379,etcd-2.etcd.infra.svc:2379"


@pytest.fixture(scope="module")
def base():
    return build(KUSTOMIZE / "base")


def test_base_validates_and_holds_every_component(base):
    validate_all(base)
    assert_clowder_invariants(base)
    assert_runtime_pods_are_reachable(base)
    kinds = {(o["kind"], o["metadata"]["name"]) for o in base}
    assert {("StatefulSet", "clowder-etcd"), ("Deployment", "clowder-controller"), ("DaemonSet", "clowder-storage"),
            ("Deployment", "clowder-balancer"), ("Service", "clowder-balancer"), ("Role", "clowder-controller"),
            ("RoleBinding", "clowder-controller"), ("ServiceAccount", "clowder-controller")} <= kinds
    assert {n for n in by_kind(base, "PodDisruptionBudget")} == {"clowder-etcd", "clowder-controller",
                                                                 "clowder-balancer"}
    assert all(o["metadata"].get("namespace") == "clowder" for o in base if o["kind"] != "Namespace")
    images = {c["image"] for kind in ("Deployment", "DaemonSet") for o in by_kind(base, kind).values()
              for c in containers(o)}
    assert images == {"ghcr.io/clowder-ai/clowder:0.1.0"}


def test_the_controller_may_manage_runtime_pods_and_nothing_else(base):
    role = by_kind(base, "Role")["clowder-controller"]
    assert {r for rule in role["rules"] for r in rule["resources"]} == {"pods", "pods/log", "events"}
    binding = by_kind(base, "RoleBinding")["clowder-controller"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "clowder-controller", "namespace": "clowder"}]
    controller = by_kind(base, "Deployment")["clowder-controller"]
    assert controller["spec"]["template"]["spec"]["serviceAccountName"] == "clowder-controller"
    assert controller["spec"]["replicas"] >= 2  # a standby for the etcd-lease leader election
    # The other workloads get no API credentials at all.
    for name, kind in (("clowder-storage", "DaemonSet"), ("clowder-balancer", "Deployment")):
        assert by_kind(base, kind)[name]["spec"]["template"]["spec"]["automountServiceAccountToken"] is False


def test_only_balancers_reach_runtimes(base):
    policy = by_kind(base, "NetworkPolicy")["clowder-runtime"]
    assert policy["spec"]["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "runtime"
    sources = [peer for rule in policy["spec"]["ingress"] for peer in rule["from"]]
    assert sources == [{"podSelector": {"matchLabels": {"app.kubernetes.io/name": "clowder",
                                                        "app.kubernetes.io/component": "balancer"}}}]


def test_storage_keeps_its_store_on_the_node(base):
    storage = by_kind(base, "DaemonSet")["clowder-storage"]
    volumes = {v["name"]: v for v in storage["spec"]["template"]["spec"]["volumes"]}
    assert volumes["store"]["hostPath"] == {"path": "/var/lib/clowder/storage", "type": "DirectoryOrCreate"}
    env = {e["name"]: e for e in storage["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["CLOWDER_NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    assert env["CLOWDER_DATA_DIR"]["value"] == "/var/lib/clowder/storage"


def test_etcd_endpoints_name_the_statefulset_members(base):
    config = by_kind(base, "ConfigMap")["clowder-config"]["data"]
    etcd = by_kind(base, "StatefulSet")["clowder-etcd"]
    members = [f"clowder-etcd-{i}.clowder-etcd-headless:2379" for i in range(etcd["spec"]["replicas"])]
    assert config["CLOWDER_ETCD_ENDPOINTS"].split(",") == members
    initial = next(a for a in etcd["spec"]["template"]["spec"]["containers"][0]["command"]
                   if a.startswith("--initial-cluster="))
    assert len(initial.split(",")) == etcd["spec"]["replicas"]


def test_external_etcd_overlay_drops_the_bundled_etcd():
    objects = build(KUSTOMIZE / "overlays" / "external-etcd")
    validate_all(objects)
    assert_clowder_invariants(objects)
    assert not [o for o in objects if o["metadata"]["name"].startswith("clowder-etcd")]
    assert by_kind(objects, "ConfigMap")["clowder-config"]["data"]["CLOWDER_ETCD_ENDPOINTS"] == EXTERNAL
    assert "clowder-controller" in by_kind(objects, "Deployment")


def test_the_dockerfile_default_command_is_a_project_module():
    dockerfile = (REPO / "deploy" / "docker" / "Dockerfile").read_text()
    modules = re.findall(r'"-m", "([a-z_]+)"', dockerfile)
    assert modules and all(importlib.util.find_spec(m) for m in modules)
    assert "USER 10001" in dockerfile
