"""The whole system as a user runs it: `clowder up --demo`, the openai client, failures, `clowder down`."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import threading
import time

import grpc
import openai
import pytest

from clowder.controller.v1 import resources_pb2
from clowder_common.auth import read_admin_token
from clowder_common.processes import free_port, pid_alive

from cluster_helpers import up_cluster

pytestmark = [pytest.mark.processes, pytest.mark.e2e]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with up_cluster(tmp_path_factory.mktemp("clowder"), wide_console=False) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def client(cluster):
    return openai.OpenAI(base_url=f"http://127.0.0.1:{cluster.http_port}/v1", api_key="unused", timeout=120,
                         max_retries=0)


def test_demo_shows_pull_progress_and_ready_line(cluster):
    text = "\n".join(cluster.output)
    assert "pull smol" in text
    assert f"ready: model smol on http://127.0.0.1:{cluster.http_port}/v1" in text


def test_models_lists_smol(client):
    assert [m.id for m in client.models.list().data] == ["smol"]


def test_chat_non_streaming_with_usage(client):
    reply = client.chat.completions.create(model="smol", messages=[{"role": "user", "content": "Say hello."}],
                                           max_tokens=12, temperature=0)
    choice = reply.choices[0]
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert reply.usage.prompt_tokens > 0 and 0 < reply.usage.completion_tokens <= 12
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_chat_streaming_matches_non_streaming(client):
    messages = [{"role": "user", "content": "List three fruits."}]
    whole = client.chat.completions.create(model="smol", messages=messages, max_tokens=24, temperature=0, seed=7)
    stream = client.chat.completions.create(model="smol", messages=messages, max_tokens=24, temperature=0, seed=7,
                                            stream=True, stream_options={"include_usage": True})
    pieces, finish, usage = [], None, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            if choice.delta.content:
                pieces.append(choice.delta.content)
            finish = choice.finish_reason or finish
    assert "".join(pieces) == whole.choices[0].message.content
    assert len(pieces) > 1  # really streamed, not one blob
    assert finish == whole.choices[0].finish_reason
    assert usage is not None and usage.completion_tokens == whole.usage.completion_tokens


def test_completion_both_ways(client):
    reply = client.completions.create(model="smol", prompt="The capital of France is", max_tokens=8, temperature=0)
    assert reply.choices[0].text and reply.usage.completion_tokens <= 8
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="smol", prompt="The capital of France is", max_tokens=8, temperature=0, stream=True) if c.choices)
    assert streamed == reply.choices[0].text


def test_openai_extras_n_logprobs_and_embeddings(client):
    messages = [{"role": "user", "content": "Name a colour."}]
    several = client.chat.completions.create(model="smol", messages=messages, n=2, max_tokens=6, temperature=0.8,
                                             seed=3, logprobs=True, top_logprobs=2)
    assert sorted(c.index for c in several.choices) == [0, 1]
    for choice in several.choices:
        assert choice.logprobs is not None and choice.logprobs.content
        assert all(t.logprob <= 0 and len(t.top_logprobs) == 2 for t in choice.logprobs.content)
    assert several.usage.completion_tokens == sum(len(c.logprobs.content) for c in several.choices)

    streamed: dict[int, list[str]] = {0: [], 1: []}
    for chunk in client.chat.completions.create(model="smol", messages=messages, n=2, max_tokens=6, temperature=0.8,
                                                seed=3, stream=True):
        for choice in chunk.choices:
            streamed[choice.index].append(choice.delta.content or "")
    assert ["".join(streamed[i]) for i in (0, 1)] == [c.message.content for c in several.choices]

    legacy = client.completions.create(model="smol", prompt="One, two,", max_tokens=3, temperature=0, logprobs=2)
    assert len(legacy.choices[0].logprobs.tokens) == legacy.usage.completion_tokens
    assert "".join(legacy.choices[0].logprobs.tokens) == legacy.choices[0].text

    embedded = client.embeddings.create(model="smol", input=["red", "green"])
    assert [d.index for d in embedded.data] == [0, 1] and len(embedded.data[0].embedding) == 576
    assert embedded.usage.prompt_tokens > 0
    with pytest.raises(openai.BadRequestError) as info:
        client.embeddings.create(model="smol", input="red", dimensions=8)
    assert info.value.body["param"] == "dimensions"


def test_unknown_model_is_404_model_not_found(client):
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])
    assert info.value.code == "model_not_found"


def test_cli_shows_the_cluster(cluster):
    ps = cluster.cli("ps")
    assert ps.returncode == 0, ps.stderr
    assert "smol" in ps.stdout and "ready" in ps.stdout and "1/1" in ps.stdout
    images = cluster.cli("image", "ls")
    assert "smol" in images.stdout and "sha256:" in images.stdout
    nodes = cluster.cli("nodes")
    assert "local" in nodes.stdout
    missing = cluster.cli("image", "rm", "ghost")
    assert missing.returncode == 1 and "NOT_FOUND" in missing.stdout


def test_the_demo_runs_the_default_fast_configuration(cluster):
    """What `make up` starts: the demo aimage's 16 slots and llama.cpp on every core of this one-node machine."""
    from clowder.runtime.v1 import runtime_pb2, runtime_pb2_grpc
    from clowder_common.clients import sync_channel
    from clowder_cli.bundled import DEMO_SLOTS

    control = cluster.control()
    try:
        replica = control.deployments.replicas("smol")[0]
    finally:
        control.close()
    with sync_channel(replica.endpoint) as channel:
        # The runtime takes calls only from cluster components: the front door cannot be walked around.
        with pytest.raises(grpc.RpcError) as refused:
            runtime_pb2_grpc.RuntimeServiceStub(channel).GetStats(runtime_pb2.GetStatsRequest(), timeout=10)
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with sync_channel(replica.endpoint, cluster.security()) as channel:
        stats = runtime_pb2_grpc.RuntimeServiceStub(channel).GetStats(runtime_pb2.GetStatsRequest(), timeout=10)
    assert stats.slots == DEMO_SLOTS == 16
    argv = pathlib.Path(f"/proc/{replica.pid}/cmdline").read_bytes().split(b"\0")
    assert argv[argv.index(b"--threads") + 1] == str(os.cpu_count()).encode()


def test_killed_runtime_is_restarted_and_serves_again(cluster, client):
    control = cluster.control()
    try:
        before = control.deployments.replicas("smol")[0]
        assert before.state == resources_pb2.REPLICA_STATE_READY and pid_alive(before.pid)
        os.kill(before.pid, 9)
        deadline = time.monotonic() + 120
        after = before
        while time.monotonic() < deadline:
            after = control.deployments.replicas("smol")[0]
            if after.state == resources_pb2.REPLICA_STATE_READY and after.pid != before.pid:
                break
            time.sleep(0.2)
        assert after.state == resources_pb2.REPLICA_STATE_READY and after.pid != before.pid, after
        assert after.restarts == before.restarts + 1
    finally:
        control.close()
    reply = client.chat.completions.create(model="smol", messages=[{"role": "user", "content": "Again?"}],
                                           max_tokens=8)
    assert reply.choices[0].message.content


def test_rest_bridge_on_the_balancer(cluster):
    import httpx

    base = f"http://127.0.0.1:{cluster.http_port}/api/v1"
    token = read_admin_token(cluster.data_dir)
    denied = httpx.get(f"{base}/images", timeout=30)
    assert denied.status_code == 401 and denied.json()["code"] == 16  # google.rpc.Status, UNAUTHENTICATED
    listed = httpx.get(f"{base}/images", headers={"Authorization": f"Bearer {token}"}, timeout=30)
    assert listed.status_code == 200, listed.text
    assert [i["alias"] for i in listed.json()["images"]] == ["smol"]
    missing = httpx.get(f"{base}/deployments/ghost", headers={"Authorization": f"Bearer {token}"}, timeout=30)
    assert missing.status_code == 404
    spec = httpx.get(f"{base}/openapi.json", timeout=30).json()
    assert spec["openapi"].startswith("3.") and "/api/v1/images" in spec["paths"]


def test_serve_spec_round_trip(cluster, client, tmp_path):
    from clowder_cli.bundled import bundled_model_path

    spec = tmp_path / "service.yaml"
    spec.write_text(f"name: poet\nimage:\n  source: {bundled_model_path().as_uri()}\n"
                    "  configuration: {systemPrompt: 'You are a poet.'}\nreplicas: 1\n")
    up = cluster.cli("serve", "up", "-f", str(spec))
    assert up.returncode == 0, up.stdout + up.stderr
    again = cluster.cli("serve", "up", "-f", str(spec))
    assert "nothing changed" in again.stdout
    reply = client.chat.completions.create(model="poet", messages=[{"role": "user", "content": "Rain?"}],
                                           max_tokens=8)
    assert reply.choices[0].message.content
    status = cluster.cli("serve", "status", "poet")
    assert "1/1 ready" in status.stdout, status.stdout

    # A changed spec rolls: the new replica is ready before the old one stops, so no request in flight fails.
    failures: list[Exception] = []
    served = []
    stop = threading.Event()

    def traffic() -> None:
        while not stop.is_set():
            try:
                client.chat.completions.create(model="poet", messages=[{"role": "user", "content": "Rain?"}],
                                               max_tokens=4)
                served.append(time.monotonic())
            except Exception as exc:  # noqa: BLE001 - every failure counts against the rollout
                failures.append(exc)

    control = cluster.control()
    try:
        before = {r.id for r in control.deployments.replicas("poet")}
    finally:
        control.close()
    sender = threading.Thread(target=traffic, daemon=True)
    sender.start()
    try:
        spec.write_text(spec.read_text().replace("You are a poet.", "You are a terse poet."))
        update = cluster.cli("serve", "update", "-f", str(spec))
        assert update.returncode == 0 and "image poet-" in update.stdout, update.stdout + update.stderr
        control = cluster.control()
        try:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                got = control.deployments.get("poet")
                replicas = control.deployments.replicas("poet")
                if (len(replicas) == 1 and replicas[0].id not in before and got.ready_replicas == 1
                        and replicas[0].state == resources_pb2.REPLICA_STATE_READY):
                    break
                time.sleep(0.2)
            else:
                raise AssertionError(f"rollout did not finish: {list(replicas)}")
        finally:
            control.close()
        switched = time.monotonic()
        while time.monotonic() - switched < 2 and not failures:
            time.sleep(0.1)
    finally:
        stop.set()
        sender.join(60)
    assert failures == [], failures
    assert served and served[-1] > switched
    logs = cluster.cli("serve", "logs", "poet")
    assert "serving on" in logs.stdout, logs.stdout
    down = cluster.cli("serve", "down", "poet")
    assert down.returncode == 0 and "is down" in down.stdout
    assert [m.id for m in client.models.list().data] == ["smol"]


def test_tools_through_an_aimage_chat_template(cluster, client, tmp_path):
    import yaml

    from clowder_cli.bundled import bundled_model_path

    tools = [{"type": "function", "function": {
        "name": "get_weather", "description": "Current weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    # SmolLM2's own template knows no tools: a clear 400, not a silently dropped tool list.
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="smol", messages=messages, tools=tools, max_tokens=8)
    assert info.value.body["code"] == "tools_unsupported"

    template = (pathlib.Path(__file__).parents[1] / "runtime" / "hermes_tools.jinja").read_text()
    spec = tmp_path / "tools.yaml"
    spec.write_text(yaml.safe_dump({"name": "toolsmith", "replicas": 1, "image": {
        "source": bundled_model_path().as_uri(), "configuration": {"chatTemplate": template}}}))
    up = cluster.cli("serve", "up", "-f", str(spec))
    assert up.returncode == 0, up.stdout + up.stderr
    try:
        forced = {"type": "function", "function": {"name": "get_weather"}}
        reply = client.chat.completions.create(model="toolsmith", messages=messages, tools=tools,
                                               tool_choice=forced, max_tokens=48, temperature=0)
        choice = reply.choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.tool_calls
        call = choice.message.tool_calls[0]
        assert call.function.name == "get_weather" and isinstance(json.loads(call.function.arguments)["city"], str)

        # The call and its result go back in; the model answers in text.
        follow = messages + [choice.message.model_dump(exclude_none=True),
                             {"role": "tool", "tool_call_id": call.id, "content": '{"celsius": 21}'}]
        answer = client.chat.completions.create(model="toolsmith", messages=follow, tools=tools, tool_choice="none",
                                                max_tokens=16, temperature=0)
        assert answer.choices[0].message.content and answer.choices[0].finish_reason in ("stop", "length")
    finally:
        cluster.cli("serve", "down", "toolsmith")


def test_push_to_a_registry_and_deploy_from_it(cluster, client, tmp_path):
    """An aimage built here goes to an OCI registry and comes back as a new aimage another cluster could use."""
    import json
    import shutil

    from clowder_common.processes import terminate, wait_for_port

    port = free_port()
    config = tmp_path / "registry.yml"
    config.write_text(json.dumps({"version": 0.1, "storage": {"filesystem": {"rootdirectory": str(tmp_path / "r")}},
                                  "http": {"addr": f"127.0.0.1:{port}"}, "log": {"level": "error"}}))
    registry = subprocess.Popen([shutil.which("docker-registry"), "serve", str(config)], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
    try:
        wait_for_port("127.0.0.1", port, 30, registry)
        target = f"oci://127.0.0.1:{port}/models/smol:v1"
        push = cluster.cli("image", "push", "smol", target)
        assert push.returncode == 0 and "pushed smol" in push.stdout, push.stdout + push.stderr
        add = cluster.cli("image", "add", "smol-oci", target)
        assert add.returncode == 0, add.stdout + add.stderr
        control = cluster.control()
        try:
            images = {i.alias: i for i in control.images.list()}
        finally:
            control.close()
        assert images["smol-oci"].digest == images["smol"].digest  # byte-identical model layer, stored once
        listing = cluster.cli("storage", "ls")
        assert "smol-oci" in listing.stdout, listing.stdout
        deploy = cluster.cli("deploy", "smol-oci", "--replicas", "1")
        assert deploy.returncode == 0, deploy.stdout
        reply = client.chat.completions.create(model="smol-oci", messages=[{"role": "user", "content": "Hi"}],
                                               max_tokens=4)
        assert reply.choices[0].message.content
        assert cluster.cli("undeploy", "smol-oci").returncode == 0
    finally:
        terminate(registry, 5)


def test_down_stops_everything(cluster):
    control = cluster.control()
    try:
        replicas = control.deployments.replicas("-")
    finally:
        control.close()
    runtime_pids = [r.pid for r in replicas]
    child_pids = _children(cluster.proc.pid)
    assert runtime_pids and child_pids
    down = cluster.cli("down")
    assert down.returncode == 0, down.stdout + down.stderr
    assert cluster.proc.wait(60) == 0
    time.sleep(0.5)
    left = [pid for pid in runtime_pids + child_pids if pid_alive(pid)]
    assert left == [], f"processes left behind: {left}"
    assert not (cluster.data_dir / "cluster.json").exists()


def _children(pid: int) -> list[int]:
    found = []
    for entry in pathlib.Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found
