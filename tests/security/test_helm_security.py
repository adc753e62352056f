"""The Helm chart wires the service credential, TLS and etcd TLS from Secrets into every Clowder component."""

from __future__ import annotations

import pathlib
import sys

import helm_python
import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "deploy"))
from deploy_helpers import CHART, by_kind, containers, documents, validate_all  # noqa: E402

pytestmark = pytest.mark.unit

COMPONENTS = ("clowder-controller", "clowder-balancer", "clowder-storage")


def render(values: dict) -> dict[str, dict]:
    rendered = helm_python.Chart.load(CHART).render(values, name="clowder", namespace="clowder")
    notes = rendered.pop(f"{CHART.name}/templates/NOTES.txt")
    assert f"create secret generic {values.get('serviceToken', {}).get('existingSecret', 'clowder-service-token')}" in notes
    objects = [doc for text in rendered.values() for doc in documents(text)]
    validate_all(objects)
    workloads = {**by_kind(objects, "Deployment"), **by_kind(objects, "DaemonSet")}
    return {name: workloads[name] for name in COMPONENTS}


def container(workload: dict) -> dict:
    return containers(workload)[-1]


def env_of(workload: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container(workload)["env"]}


def test_every_component_gets_the_service_credential_from_a_secret_and_plaintext_by_default():
    for name, workload in render({}).items():
        env = env_of(workload)
        token = env["CLOWDER_SERVICE_TOKEN"]
        assert "value" not in token, name
        assert token["valueFrom"]["secretKeyRef"] == {"name": "clowder-service-token", "key": "token"}
        assert not any(k.startswith(("CLOWDER_TLS_", "CLOWDER_ETCD_CA")) for k in env), name
        assert "grpc" in container(workload)["readinessProbe"], name


def test_tls_and_etcd_tls_come_from_mounted_secrets():
    values = {"serviceToken": {"existingSecret": "svc", "key": "k"},
              "tls": {"existingSecret": "clowder-tls", "clientAuth": True},
              "etcdTls": {"existingSecret": "etcd-client"}}
    for workload in render(values).values():
        env = env_of(workload)
        assert env["CLOWDER_SERVICE_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "svc", "key": "k"}
        assert env["CLOWDER_TLS_CERT_FILE"]["value"] == "/etc/clowder/tls/tls.crt"
        assert env["CLOWDER_TLS_KEY_FILE"]["value"] == "/etc/clowder/tls/tls.key"
        assert env["CLOWDER_TLS_CA_FILE"]["value"] == "/etc/clowder/tls/ca.crt"
        assert env["CLOWDER_TLS_CLIENT_AUTH"]["value"] == "true"
        assert env["CLOWDER_ETCD_CERT_FILE"]["value"] == "/etc/clowder/etcd-tls/tls.crt"
        mounts = {m["name"]: m for m in container(workload)["volumeMounts"]}
        assert mounts["tls"]["readOnly"] and mounts["etcd-tls"]["mountPath"] == "/etc/clowder/etcd-tls"
        volumes = {v["name"]: v for v in workload["spec"]["template"]["spec"]["volumes"]}
        assert volumes["tls"]["secret"]["secretName"] == "clowder-tls"
        assert volumes["etcd-tls"]["secret"]["secretName"] == "etcd-client"
        # Kubernetes' gRPC probes cannot speak TLS: a TLS port is probed by TCP.
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            assert "tcpSocket" in container(workload)[probe] and "grpc" not in container(workload)[probe]


def test_runtime_pods_get_the_service_credential_from_its_secret():
    from clowder.controller.v1 import resources_pb2
    from clowder_controller.kubernetes_launcher import KubernetesSettings, build_pod
    from clowder_controller.launcher import RuntimeSpec

    settings = KubernetesSettings(service_token_secret="svc-secret")
    spec = RuntimeSpec(deployment="smol", replica_id="1a2b3c4d-0", node="worker-1", digest="sha256:" + "a" * 64,
                       storage_address="10.0.0.5:3093", configuration=resources_pb2.ImageConfiguration(),
                       threads=2)
    pod = build_pod(spec, settings, ("etcd.clowder:2379",), "/clowder/",
                    {"name": "clowder-controller", "uid": "u-1"})
    env = {e["name"]: e for e in pod["spec"]["containers"][0]["env"]}
    assert env["CLOWDER_SERVICE_TOKEN"] == {"name": "CLOWDER_SERVICE_TOKEN", "valueFrom": {
        "secretKeyRef": {"name": "svc-secret", "key": "token"}}}
    assert "svc-secret" not in " ".join(pod["spec"]["containers"][0]["args"])
