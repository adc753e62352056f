"""The Helm chart renders offline (helm-python-sdk) with default and other values; every object validates strictly."""

from __future__ import annotations

import helm_python
import pytest

from deploy_helpers import (CHART, KUSTOMIZE, assert_clowder_invariants, assert_runtime_pods_are_reachable, by_kind,
                            containers, documents, runtime_pod, validate_all)
from kustomize_lite import build

pytestmark = pytest.mark.unit

NON_DEFAULT = {
    "image": {"repository": "registry.example.com/ml/clowder", "tag": "1.2.3", "pullPolicy": "Always"},
    "imagePullSecrets": [{"name": "regcred"}],
    "adminToken": {"existingSecret": "ml-admin", "key": "admin"},
    "etcdPrefix": "/team-a/",
    "etcd": {"enabled": False},
    "externalEtcd": {"endpoints": ["etcd-a.infra:2379", "etcd-b.infra:2379"]},
    "controller": {"replicas": 3, "resources": {"requests": {"cpu": "250m", "memory": "512Mi"}}},
    "storage": {"hostPath": "/mnt/nvme/clowder", "nodeSelector": {"clowder.dev/models": "true"},
                "tolerations": [{"key": "gpu", "operator": "Exists", "effect": "NoSchedule"}]},
    "balancer": {"replicas": 4, "service": {"type": "LoadBalancer", "httpPort": 80, "grpcPort": 8443,
                                            "annotations": {"example.com/lb": "internal"},
                                            "loadBalancerSourceRanges": ["10.0.0.0/8"]},
                 "resources": {"limits": {"cpu": 2, "memory": "2Gi"}}},
    "networkPolicy": {"enabled": False},
    "podDisruptionBudget": {"enabled": False},
}


def render(values: dict | None = None, name: str = "clowder", namespace: str = "clowder") -> tuple[list[dict], str]:
    rendered = helm_python.Chart.load(CHART).render(values or {}, name=name, namespace=namespace)
    notes = rendered.pop(f"{CHART.name}/templates/NOTES.txt")
    return [doc for text in rendered.values() for doc in documents(text)], notes


def test_default_values_render_valid_objects_like_the_kustomize_base():
    objects, notes = render()
    validate_all(objects)
    assert_clowder_invariants(objects)
    assert_runtime_pods_are_reachable(objects)
    # The same objects as deploy/k8s/base (which adds the Namespace itself).
    base = {(o["kind"], o["metadata"]["name"]) for o in build(KUSTOMIZE / "base") if o["kind"] != "Namespace"}
    assert {(o["kind"], o["metadata"]["name"]) for o in objects} == base
    etcd = by_kind(objects, "StatefulSet")["clowder-etcd"]
    assert etcd["spec"]["replicas"] == 3
    config = by_kind(objects, "ConfigMap")["clowder-config"]["data"]
    assert config["CLOWDER_ETCD_ENDPOINTS"].count(":2379") == 3
    assert by_kind(objects, "Service")["clowder-balancer"]["spec"]["type"] == "ClusterIP"
    assert "port-forward service/clowder-balancer 3090:3090" in notes
    assert "create secret generic clowder-admin-token" in notes


def test_other_values_change_what_they_should():
    objects, notes = render(NON_DEFAULT, name="prod", namespace="ml")
    validate_all(objects)
    assert_clowder_invariants(objects)
    assert not by_kind(objects, "StatefulSet") and not by_kind(objects, "NetworkPolicy")
    assert not by_kind(objects, "PodDisruptionBudget")
    config = by_kind(objects, "ConfigMap")["prod-clowder-config"]["data"]
    assert config == {"CLOWDER_ETCD_ENDPOINTS": "etcd-a.infra:2379,etcd-b.infra:2379", "CLOWDER_ETCD_PREFIX": "/team-a/"}
    service = by_kind(objects, "Service")["prod-clowder-balancer"]
    assert service["spec"]["type"] == "LoadBalancer" and service["spec"]["loadBalancerSourceRanges"] == ["10.0.0.0/8"]
    assert [p["port"] for p in service["spec"]["ports"]] == [80, 8443]
    assert service["metadata"]["annotations"] == {"example.com/lb": "internal"}
    storage = by_kind(objects, "DaemonSet")["prod-clowder-storage"]["spec"]["template"]["spec"]
    assert storage["volumes"][0]["hostPath"]["path"] == "/mnt/nvme/clowder"
    assert storage["nodeSelector"] == {"clowder.dev/models": "true"} and storage["tolerations"][0]["key"] == "gpu"
    deployments = by_kind(objects, "Deployment")
    assert deployments["prod-clowder-controller"]["spec"]["replicas"] == 3
    assert deployments["prod-clowder-balancer"]["spec"]["replicas"] == 4
    controller = deployments["prod-clowder-controller"]["spec"]["template"]["spec"]
    # Helm merges maps: the given requests replace the defaults, the default limit stays.
    assert controller["containers"][0]["resources"] == {"requests": {"cpu": "250m", "memory": "512Mi"},
                                                        "limits": {"memory": "1Gi"}}
    assert controller["imagePullSecrets"] == [{"name": "regcred"}]
    token = next(e for e in controller["containers"][0]["env"] if e["name"] == "CLOWDER_ADMIN_TOKEN")
    assert token["valueFrom"]["secretKeyRef"] == {"name": "ml-admin", "key": "admin"}
    for workload in (*deployments.values(), *by_kind(objects, "DaemonSet").values()):
        assert {c["image"] for c in containers(workload)} == {"registry.example.com/ml/clowder:1.2.3"}
    binding = by_kind(objects, "RoleBinding")["prod-clowder-controller"]
    assert binding["subjects"][0]["namespace"] == "ml"
    balancer_env = {e["name"]: e.get("value") for e in
                    deployments["prod-clowder-balancer"]["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert balancer_env["CLOWDER_CONTROLLER_ADDRESS"] == "prod-clowder-controller:3092"
    assert "status.loadBalancer.ingress" in notes and "etcd-a.infra:2379" in notes


def test_single_member_etcd_and_node_port():
    objects, notes = render({"etcd": {"enabled": True, "replicas": 1}, "balancer": {"service": {"type": "NodePort"}}})
    validate_all(objects)
    etcd = by_kind(objects, "StatefulSet")["clowder-etcd"]
    initial = next(a for a in etcd["spec"]["template"]["spec"]["containers"][0]["command"]
                   if a.startswith("--initial-cluster="))
    assert initial == "--initial-cluster=clowder-etcd-0=http://clowder-etcd-0.clowder-etcd-headless:2380"
    assert "nodePort" in notes


def controller_env(objects: list[dict]) -> dict[str, str]:
    controller = by_kind(objects, "Deployment")["clowder-controller"]
    return {e["name"]: e.get("value") for e in containers(controller)[0]["env"]}


def test_runtime_values_become_the_controllers_runtime_defaults():
    objects, _ = render({"runtime": {"slots": 16, "threads": 4, "contextSize": 4096, "batchSize": 512}})
    validate_all(objects)
    env = controller_env(objects)
    assert {k: v for k, v in env.items() if k.startswith("CLOWDER_RUNTIME_")} == {
        "CLOWDER_RUNTIME_SLOTS": "16", "CLOWDER_RUNTIME_THREADS": "4", "CLOWDER_RUNTIME_CONTEXT_SIZE": "4096",
        "CLOWDER_RUNTIME_BATCH_SIZE": "512"}
    # The controller reads exactly these (its config from the environment).
    from clowder_common.config import load_config
    from clowder_controller.config import ControllerConfig

    config = load_config(ControllerConfig, env={k: v for k, v in env.items() if k.startswith("CLOWDER_RUNTIME_")})
    assert (config.runtime_slots, config.runtime_threads, config.runtime_context_size,
            config.runtime_batch_size) == (16, 4, 4096, 512)
    # 0 (the default) passes nothing: the runtime's own defaults apply.
    defaults, _ = render({"runtime": {"slots": 0}})
    assert not [k for k in controller_env(defaults) if k.startswith("CLOWDER_RUNTIME_")]


def test_runtime_pods_follow_the_installs_image_secrets_store_and_tls():
    objects, _ = render(NON_DEFAULT)
    pod = runtime_pod(objects)
    container = pod["spec"]["containers"][0]
    assert container["image"] == "registry.example.com/ml/clowder:1.2.3"
    env = {e["name"]: e for e in container["env"]}
    assert env["CLOWDER_ADMIN_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "ml-admin", "key": "admin"}
    assert pod["spec"]["volumes"][0]["hostPath"]["path"] == "/mnt/nvme/clowder"
    assert "readinessProbe" in container and "grpc" in container["readinessProbe"]
    # With TLS, runtime pods serve it from the same Secret as every component, and are probed by TCP
    # (Kubernetes' gRPC probes cannot speak TLS).
    objects, _ = render({"tls": {"existingSecret": "clowder-tls", "clientAuth": True},
                         "etcdTls": {"existingSecret": "etcd-client"}})
    pod = runtime_pod(objects)
    container = pod["spec"]["containers"][0]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["CLOWDER_TLS_CERT_FILE"] == "/etc/clowder/tls/tls.crt" and env["CLOWDER_TLS_CLIENT_AUTH"] == "true"
    assert env["CLOWDER_ETCD_CA_FILE"] == "/etc/clowder/etcd-tls/ca.crt"
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    assert volumes["tls"]["secret"]["secretName"] == "clowder-tls"
    assert volumes["etcd-tls"]["secret"]["secretName"] == "etcd-client"
    assert "tcpSocket" in container["readinessProbe"] and "tcpSocket" in container["startupProbe"]


@pytest.mark.parametrize("values, mentions", [
    ({"runtime": {"slots": 300}}, "slots"),
    ({"runtime": {"threads": -1}}, "threads"),
    ({"runtime": {"parallel": 8}}, "parallel"),
    ({"etcd": {"enabled": False}}, "endpoints"),
    ({"etcd": {"enabled": True}, "externalEtcd": {"endpoints": ["etcd:2379"]}}, "endpoints"),
    ({"etcd": {"enabled": True, "replicas": 2}}, "replicas"),
    ({"balancer": {"service": {"type": "Ingress"}}}, "type"),
    ({"adminToken": {"existingSecret": ""}}, "existingSecret"),
    ({"adminToken": {"value": "s3cret"}}, "value"),
    ({"storage": {"hostPath": "relative/dir"}}, "hostPath"),
    ({"replicas": 2}, "replicas"),
])
def test_the_schema_refuses_bad_values(values, mentions):
    with pytest.raises(helm_python.HelmError) as err:
        render(values)
    assert mentions in str(err.value)


def test_helm_lint_finds_nothing():
    report = helm_python.lint(CHART, {}, strict=True, kube_version="v1.35.0")
    assert report["errors"] == [] and not [m for m in report["messages"] if m["severity"] >= 2], report
