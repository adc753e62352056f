"""Revisions on a real cluster (`clowder up`: etcd, controller, storage, balancer, runtimes with the bundled
model): a weighted split, pins, sessions, promote and rollback by hand, canaries that roll back on their own, and
a canary that goes on after its controller is SIGKILLed.

Requests use max_tokens=1: what is checked is which revision serves, not what it says.
"""

from __future__ import annotations

import collections
import concurrent.futures
import json
import os
import signal
import threading
import time

import grpc
import httpx
import pytest

from clowder.balancer.v1 import inference_pb2, inference_pb2_grpc
from clowder.controller.v1 import resources_pb2
from clowder.runtime.v1 import runtime_pb2
from clowder_common.errors import NotFound, Unavailable

from cluster_helpers import up_cluster
from helpers.wait import wait_for_sync

pytestmark = [pytest.mark.processes, pytest.mark.e2e]

HEADER = "x-clowder-revision"
READY_S = 240


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with up_cluster(tmp_path_factory.mktemp("clowder"), demo=False) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def control(cluster):
    client = cluster.control()
    yield client
    client.close()


@pytest.fixture(scope="module")
def http(cluster):
    with httpx.Client(base_url=f"http://127.0.0.1:{cluster.http_port}", timeout=120) as client:
        yield client


@pytest.fixture(scope="module")
def model(model_path) -> str:
    return f"file://{model_path}"


def spec(path, name: str, source: str, *, context: int = 512, rollout: str = "", runtime: str = ""):
    """A service spec file; a different `context` (or source) is a different image, so a new revision."""
    text = (f"name: {name}\nimage:\n  source: {source}\n  configuration: {{contextSize: {context}, slots: 2}}\n"
            f"replicas: 1\n")
    if rollout:
        text += f"rollout: {rollout}\n"
    if runtime:
        text += f"runtime: {runtime}\n"
    path.write_text(text)
    return str(path)


def serve(cluster, *args: str, ok: bool = True) -> str:
    done = cluster.cli("serve", *args)
    output = done.stdout + done.stderr
    assert (done.returncode == 0) == ok, output
    return output


def ask(http, model: str, pin: str = "", session: str = "") -> httpx.Response:
    headers = {**({HEADER: pin} if pin else {}), **({"x-session-id": session} if session else {})}
    return http.post("/v1/chat/completions", headers=headers, json={
        "model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1})


def served_by(http, model: str, **kwargs) -> str:
    reply = ask(http, model, **kwargs)
    assert reply.status_code == 200, reply.text
    return reply.headers[HEADER]


def gone(control, deployment: str) -> bool:
    try:
        control.deployments.get(deployment)
    except NotFound:
        return True
    return False


def answered(control, name: str) -> resources_pb2.Service | None:
    """The service as the controller has it; None while no controller answers (one is starting again)."""
    try:
        return control.services.get(name)
    except Unavailable:
        return None


class Traffic:
    """Requests one after another in a thread: (time, status, revision header) of each."""

    def __init__(self, http, model: str) -> None:
        self.http, self.model = http, model
        self.results: list[tuple[float, int, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                reply = ask(self.http, self.model)
                self.results.append((time.monotonic(), reply.status_code, reply.headers.get(HEADER, "")))
            except httpx.HTTPError as exc:
                self.results.append((time.monotonic(), 0, repr(exc)))

    def __enter__(self) -> "Traffic":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(150)

    def of(self, revision: str) -> list[tuple[float, int, str]]:
        return [r for r in self.results if r[2] == revision]


def test_a_split_pins_sessions_promote_and_rollback_by_hand(cluster, control, http, tmp_path, model):
    serve(cluster, "up", "-f", spec(tmp_path / "v1.yaml", "ab", model))
    control.deployments.wait_ready("ab", timeout_s=READY_S)
    assert served_by(http, "ab") == "1"

    # Nothing to split or move with one revision: clear errors, nothing written.
    before = control.services.get("ab")
    assert "one revision" in serve(cluster, "update", "-f", str(tmp_path / "v1.yaml"), "--weight", "30", ok=False)
    assert "nothing to promote" in serve(cluster, "promote", "ab", ok=False)
    assert "one revision" in serve(cluster, "rollback", "ab", ok=False)
    assert control.services.get("ab").update_time == before.update_time

    out = serve(cluster, "update", "-f", spec(tmp_path / "v2.yaml", "ab", model, context=640), "--weight", "30")
    assert "revision 2" in out
    control.deployments.wait_ready("ab-r2", timeout_s=READY_S)
    models = {m["id"] for m in http.get("/v1/models").json()["data"]}
    assert "ab" in models and "ab-r2" not in models and "ab-r1" not in models

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        served = list(pool.map(lambda _: served_by(http, "ab"), range(200)))
    counts = collections.Counter(served)
    assert set(counts) == {"1", "2"}
    assert 40 <= counts["2"] <= 80, counts  # 30% of 200, within 10 points

    assert {served_by(http, "ab", pin="1") for _ in range(10)} == {"1"}
    assert {served_by(http, "ab", pin="2") for _ in range(10)} == {"2"}
    unknown = ask(http, "ab", pin="7")
    assert unknown.status_code == 404 and "no revision 7" in unknown.json()["error"]["message"]
    assert ask(http, "ab", pin="seven").status_code == 400
    for session in ("alice", "bob", "carol", "dave", "erin"):
        assert len({served_by(http, "ab", session=session) for _ in range(4)}) == 1

    # gRPC: the revision comes back in the trailing metadata (the initial metadata leaves before it is chosen).
    address = json.loads((cluster.data_dir / "cluster.json").read_text())["balancer_grpc"]
    with grpc.insecure_channel(address) as channel:
        call = inference_pb2_grpc.InferenceServiceStub(channel).CreateChatCompletion(
            inference_pb2.CreateChatCompletionRequest(
                model="ab", messages=[runtime_pb2.ChatMessage(role="user", content="hi")],
                sampling=runtime_pb2.SamplingParams(max_tokens=1)),
            metadata=((HEADER, "2"),), timeout=120)
        assert list(call)
        assert (HEADER, "2") in tuple(call.trailing_metadata())
    metrics = http.get("/metrics").text
    assert 'clowder_balancer_revision_requests_total{model="ab",outcome="ok",revision="2"}' in metrics

    status = serve(cluster, "status", "ab")
    assert "fixed" in status and "70%" in status and "30%" in status and "ab-r2" in status

    # Weights that do not add up, unknown revisions: refused, nothing changed.
    before = control.services.get("ab")
    assert "add up to 90" in serve(cluster, "traffic", "ab", "1=50", "2=40", ok=False)
    assert "no revision 9" in serve(cluster, "traffic", "ab", "1=50", "9=50", ok=False)
    assert "no revision 9" in serve(cluster, "rollback", "ab", "--to", "9", ok=False)
    after = control.services.get("ab")
    assert (after.update_time, list(after.traffic)) == (before.update_time, list(before.traffic))

    serve(cluster, "promote", "ab")
    assert {served_by(http, "ab") for _ in range(10)} == {"2"}
    wait_for_sync(lambda: gone(control, "ab"), 60, "revision 1's deployment removed after promote")

    # Back to revision 1 by hand: it rolls over the live deployment in place.
    assert "rolled back from revision 2 to 1" in serve(cluster, "rollback", "ab")
    assert {served_by(http, "ab") for _ in range(10)} == {"1"}
    v1_image = control.services.get("ab").revisions[0].template.image
    wait_for_sync(lambda: control.deployments.get("ab-r2").image == v1_image, 30, "ab-r2 rolled to revision 1")
    history = serve(cluster, "history", "ab")
    assert "stable (100%)" in history and "retired" in history
    serve(cluster, "down", "ab")


def test_a_canary_that_cannot_start_rolls_back_on_its_own(cluster, control, http, tmp_path, model):
    interval = 6
    rollout = f"{{strategy: canary, steps: [20, 100], interval: {interval}s}}"
    serve(cluster, "up", "-f", spec(tmp_path / "v1.yaml", "cb", model, rollout=rollout))
    control.deployments.wait_ready("cb", timeout_s=READY_S)
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(os.urandom(100_000))  # not a GGUF: the runtime exits as it loads it
    with Traffic(http, "cb") as traffic:
        wait_for_sync(lambda: len(traffic.results) >= 3, 60, "traffic flows")
        serve(cluster, "update", "-f", spec(tmp_path / "v2.yaml", "cb", f"file://{broken}", rollout=rollout))
        updated = time.monotonic()
        service = wait_for_sync(lambda: (s := control.services.get("cb")).rollout.state
                             == resources_pb2.ROLLOUT_STATE_ROLLED_BACK and s, 2 * interval + 3, "rolled back")
        took = time.monotonic() - updated
        time.sleep(1)
    assert service.rollout.stable_revision == 1 and [(t.revision, t.percent) for t in service.traffic] == [(1, 100)]
    assert "revision 2 failed" in service.rollout.message and "exited" in service.rollout.message, service.rollout
    assert service.events[-1].reason == "rolled-back"
    assert took <= 2 * interval + 3
    # No request failed: the canary never took traffic, and the stable revision served all of it.
    assert [r for r in traffic.results if r[1] != 200] == []
    assert {r[2] for r in traffic.results} == {"1"}
    wait_for_sync(lambda: gone(control, "cb-r2"), 60, "the failed revision's deployment removed")
    assert "rolled_back" in serve(cluster, "status", "cb")
    serve(cluster, "down", "cb")


def test_a_canary_that_fails_requests_rolls_back_and_the_stable_one_never_fails(cluster, control, http, tmp_path,
                                                                                 model):
    interval = 5
    rollout = f"{{strategy: canary, steps: [50, 100], interval: {interval}s, maxErrorRate: 0.2, maxTtftRatio: 100}}"
    serve(cluster, "up", "-f", spec(tmp_path / "v1.yaml", "cc", model, rollout=rollout))
    control.deployments.wait_ready("cc", timeout_s=READY_S)
    with Traffic(http, "cc") as traffic:
        # A context of 16 tokens holds no chat prompt: the new revision answers every request with an error.
        serve(cluster, "update", "-f", spec(tmp_path / "v2.yaml", "cc", model, rollout=rollout,
                                            runtime="{context_size: 16}"))
        wait_for_sync(lambda: control.services.get("cc").rollout.HasField("step_start_time"), READY_S,
                   "the canary's first step")
        stepped = time.monotonic()
        service = wait_for_sync(lambda: (s := control.services.get("cc")).rollout.state
                             == resources_pb2.ROLLOUT_STATE_ROLLED_BACK and s, 2 * interval + 3, "rolled back")
        took = time.monotonic() - stepped
        time.sleep(1)
    assert "error rate" in service.rollout.message, service.rollout
    assert took <= 2 * interval + 3
    assert traffic.of("2") and all(status != 200 for _, status, _ in traffic.of("2"))
    stable = traffic.of("1")
    assert len(stable) + len(traffic.of("2")) == len(traffic.results)
    assert stable and all(status == 200 for _, status, _ in stable)
    wait_for_sync(lambda: gone(control, "cc-r2"), 60, "the failed revision's deployment removed")
    serve(cluster, "down", "cc")


def test_a_canary_goes_on_after_the_controller_is_killed_and_is_promoted(cluster, control, http, tmp_path, model):
    interval = 6
    rollout = (f"{{strategy: canary, steps: [25, 50, 100], interval: {interval}s, maxErrorRate: 0.5, "
               "maxTtftRatio: 100}")
    serve(cluster, "up", "-f", spec(tmp_path / "v1.yaml", "cd", model, rollout=rollout))
    control.deployments.wait_ready("cd", timeout_s=READY_S)
    with Traffic(http, "cd") as traffic:
        serve(cluster, "update", "-f", spec(tmp_path / "v2.yaml", "cd", model, context=640, rollout=rollout))
        first = wait_for_sync(lambda: (s := control.services.get("cd")).rollout.HasField("step_start_time") and s,
                           READY_S, "the canary's first step")
        assert first.rollout.step == 0 and [t.percent for t in first.traffic] == [75, 25]
        controller = cluster.component("controller")
        os.kill(controller["pid"], signal.SIGKILL)
        # The supervisor starts a new controller; it leads once the old one's lease expires, and goes on from the
        # step etcd holds.
        service = wait_for_sync(lambda: (s := answered(control, "cd")) is not None and s.rollout.state
                             == resources_pb2.ROLLOUT_STATE_STABLE and s.rollout.stable_revision == 2 and s,
                             120, "revision 2 promoted")
    assert cluster.component("controller")["restarts"] == 1
    steps = [e.message for e in service.events if e.reason == "step"]
    assert steps == ["step 1/3: 25% to revision 2", "step 2/3: 50% to revision 2"], steps
    assert service.events[-1].reason == "promoted"
    assert [r for r in traffic.results if r[1] != 200] == []
    assert {served_by(http, "cd") for _ in range(5)} == {"2"}
    wait_for_sync(lambda: gone(control, "cd"), 60, "revision 1's deployment removed after the promotion")
    serve(cluster, "down", "cd")
