"""The Kubernetes launcher: pod specs validated against the 1.35 schema, and the API calls it makes answered
by a local HTTP server speaking the Kubernetes JSON shapes (no cluster runs here)."""

from __future__ import annotations

import copy
import datetime
import uuid

import kubernetes
import kubernetes_validate
import pytest
from aiohttp import web

from clowder.controller.v1 import resources_pb2
from clowder_controller.kubernetes_launcher import (KubernetesLauncher, KubernetesSettings, build_pod,
                                                    pod_name)
from clowder_controller.launcher import RuntimeSpec, RuntimeState

SETTINGS = KubernetesSettings(namespace="clowder", runtime_image="registry.local/clowder:1", resync_s=0.2)
OWNER = {"name": "clowder-controller", "uid": "6c1f0f57-2a3e-4a38-9b1e-0d5f1b1f1a11"}


def spec(deployment="smol", replica="1a2b3c4d-0", node="worker-1"):
    return RuntimeSpec(deployment=deployment, replica_id=replica, node=node, digest="sha256:" + "a" * 64,
                       storage_address="10.0.0.5:3093",
                       configuration=resources_pb2.ImageConfiguration(system_prompt="hi", context_size=4096),
                       threads=4)


@pytest.mark.unit
@pytest.mark.parametrize("deployment, replica", [("smol", "1a2b3c4d-0"), ("my_model.v2", "ffffffff-12"),
                                                 ("a" * 63, "0123abcd-7")])
def test_pod_spec_is_valid_for_kubernetes_1_35(deployment, replica):
    pod = build_pod(spec(deployment, replica), SETTINGS, ("etcd.clowder:2379",), "/clowder/", OWNER)
    kubernetes_validate.validate(pod, "1.35", strict=True)
    assert len(pod["metadata"]["name"]) <= 63


@pytest.mark.unit
def test_pod_is_pinned_mounts_the_store_read_only_and_never_inlines_the_token():
    pod = build_pod(spec(), SETTINGS, ("etcd.clowder:2379",), "/clowder/", OWNER)
    podspec = pod["spec"]
    container = podspec["containers"][0]
    assert podspec["nodeName"] == "worker-1"
    assert container["volumeMounts"] == [{"name": "models", "mountPath": SETTINGS.store_path, "readOnly": True}]
    assert podspec["volumes"][0]["hostPath"]["path"] == SETTINGS.store_path
    token = next(e for e in container["env"] if e["name"] == "CLOWDER_ADMIN_TOKEN")
    assert "value" not in token and token["valueFrom"]["secretKeyRef"]["name"] == SETTINGS.token_secret
    assert container["readinessProbe"]["grpc"]["port"] == SETTINGS.runtime_port
    assert pod["metadata"]["ownerReferences"][0]["uid"] == OWNER["uid"]
    args = container["args"]
    assert args[args.index("--replica-id") + 1] == "1a2b3c4d-0"
    assert args[args.index("--advertise-host") + 1] == "$(POD_IP)"


@pytest.mark.unit
def test_pod_names_stay_unique_when_shortened():
    long = "d" * 63
    assert pod_name(long, "aaaa-1") != pod_name(long, "aaaa-2")
    assert all(len(pod_name(long, r)) <= 63 for r in ("aaaa-1", "aaaa-2"))


class FakeKubernetes:
    """Just the core/v1 endpoints the launcher calls, with API-server-shaped replies and errors."""

    def __init__(self) -> None:
        self.pods: dict[str, dict] = {}
        self.calls: list[tuple[str, str]] = []
        self.app = web.Application(middlewares=[self._record])
        self.app.router.add_get("/api/v1/namespaces/{ns}/configmaps/{name}", self.get_configmap)
        self.app.router.add_post("/api/v1/namespaces/{ns}/pods", self.create_pod)
        self.app.router.add_get("/api/v1/namespaces/{ns}/pods", self.list_pods)
        self.app.router.add_get("/api/v1/namespaces/{ns}/pods/{name}", self.get_pod)
        self.app.router.add_delete("/api/v1/namespaces/{ns}/pods/{name}", self.delete_pod)

    @web.middleware
    async def _record(self, request, handler):
        self.calls.append((request.method, request.path))
        return await handler(request)

    @staticmethod
    def status(code: int, reason: str, message: str) -> web.Response:
        return web.json_response({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                                  "message": message, "reason": reason, "code": code}, status=code)

    async def get_configmap(self, request):
        name = request.match_info["name"]
        if name != OWNER["name"]:
            return self.status(404, "NotFound", f'configmaps "{name}" not found')
        return web.json_response({"kind": "ConfigMap", "apiVersion": "v1",
                                  "metadata": {"name": name, "namespace": request.match_info["ns"],
                                               "uid": OWNER["uid"], "resourceVersion": "1"}, "data": {}})

    async def create_pod(self, request):
        body = await request.json()
        # The server checks what it would check: a valid pod, or 422 Invalid.
        try:
            kubernetes_validate.validate(body, "1.35", strict=True)
        except kubernetes_validate.ValidationError as exc:
            return self.status(422, "Invalid", str(exc))
        name = body["metadata"]["name"]
        if name in self.pods:
            return self.status(409, "AlreadyExists", f'pods "{name}" already exists')
        pod = copy.deepcopy(body)
        pod["metadata"].update(uid=str(uuid.uuid4()), resourceVersion=str(len(self.calls)),
                               creationTimestamp=datetime.datetime.now(datetime.timezone.utc)
                               .strftime("%Y-%m-%dT%H:%M:%SZ"))
        pod["status"] = {"phase": "Pending"}
        self.pods[name] = pod
        return web.json_response(pod, status=201)

    async def list_pods(self, request):
        selector = request.query.get("labelSelector", "")
        wanted = dict(part.split("=", 1) for part in selector.split(",") if part)
        items = [p for p in self.pods.values()
                 if wanted.items() <= p["metadata"].get("labels", {}).items()]
        return web.json_response({"kind": "PodList", "apiVersion": "v1",
                                  "metadata": {"resourceVersion": str(len(self.calls))}, "items": items})

    async def get_pod(self, request):
        pod = self.pods.get(request.match_info["name"])
        if pod is None:
            return self.status(404, "NotFound", f'pods "{request.match_info["name"]}" not found')
        return web.json_response(pod)

    async def delete_pod(self, request):
        pod = self.pods.pop(request.match_info["name"], None)
        if pod is None:
            return self.status(404, "NotFound", f'pods "{request.match_info["name"]}" not found')
        return web.json_response(pod)

    def set_phase(self, name: str, phase: str, exit_code: int | None = None) -> None:
        """What the kubelet would report."""
        status = {"phase": phase}
        if exit_code is not None:
            status["containerStatuses"] = [{"name": "runtime", "ready": False, "restartCount": 0, "image": "x",
                                            "imageID": "", "state": {"terminated": {"exitCode": exit_code}}}]
        self.pods[name]["status"] = status


@pytest.fixture
async def api():
    fake = FakeKubernetes()
    runner = web.AppRunner(fake.app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    yield fake, f"http://127.0.0.1:{port}"
    await runner.cleanup()


@pytest.mark.inprocess
async def test_launcher_drives_pods_through_the_api(api):
    fake, url = api
    configuration = kubernetes.client.Configuration()
    configuration.host = url
    launcher = KubernetesLauncher(kubernetes.client.ApiClient(configuration), SETTINGS, ("etcd:2379",),
                                  "/clowder/")
    await launcher.start_watching()
    try:
        s = spec()
        replica = resources_pb2.Replica(id=s.replica_id, deployment=s.deployment, node=s.node)
        assert await launcher.start(s) == 0
        name = pod_name(s.deployment, s.replica_id)
        assert fake.pods[name]["spec"]["nodeName"] == "worker-1"
        assert launcher.status(replica).state is RuntimeState.RUNNING

        # The kubelet reports the container failed: after a listing, status says so with the exit code.
        fake.set_phase(name, "Failed", exit_code=137)
        await launcher.refresh()
        status = launcher.status(replica)
        assert status.state is RuntimeState.EXITED and status.exit_code == 137

        # Starting again replaces the pod (delete, then create) instead of failing with AlreadyExists.
        old_uid = fake.pods[name]["metadata"]["uid"]
        await launcher.start(s)
        assert fake.pods[name]["metadata"]["uid"] != old_uid
        assert ("DELETE", f"/api/v1/namespaces/clowder/pods/{name}") in fake.calls

        # Stop deletes the pod; stopping a pod that is gone is not an error.
        await launcher.stop(replica, grace=5)
        assert name not in fake.pods
        await launcher.stop(replica, grace=5)
        await launcher.refresh()
        assert launcher.status(replica).state is RuntimeState.EXITED

        # A pod listing only returns this controller's pods.
        fake.pods["other"] = {"metadata": {"name": "other", "labels": {"app": "x"}}, "status": {"phase": "Running"}}
        await launcher.refresh()
        assert "other" not in launcher._pods
    finally:
        await launcher.stop_all(1)


@pytest.mark.inprocess
async def test_missing_owner_is_a_clear_error(api):
    fake, url = api
    configuration = kubernetes.client.Configuration()
    configuration.host = url
    settings = KubernetesSettings(namespace="clowder", owner_configmap="absent")
    launcher = KubernetesLauncher(kubernetes.client.ApiClient(configuration), settings, ("etcd:2379",), "/c/")
    with pytest.raises(kubernetes.client.exceptions.ApiException) as err:
        await launcher.start_watching()
    assert err.value.status == 404
    await launcher.stop_all(1)
