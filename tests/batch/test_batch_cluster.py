"""Batch jobs on a real cluster (`clowder up --demo`: etcd, storage, controller, balancer, a runtime with the
bundled model) driven by the official openai client: upload, create, poll, download; cancel; validation;
the balancer and the runtime SIGKILLed mid-batch with no result lost or duplicated.

One cluster for the module; each test runs its own batch. Lines ask for few tokens, so a batch takes seconds.
"""

from __future__ import annotations

import collections
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request

import grpc
import openai
import pytest

from clowder.balancer.v1 import batch_pb2, batch_pb2_grpc
from clowder_common.auth import TOKEN_ENV, read_admin_token
from clowder_common.processes import free_port, wait_for_port
from clowder_common.security import SERVICE_TOKEN_ENV, service_token_path

from clowder_cli.bundled import DEMO_SLOTS

from batch_helpers import chat_lines, custom_ids, ended, jsonl, lines_of, poll, upload
from cluster_helpers import smol_replica, up_cluster

pytestmark = [pytest.mark.processes, pytest.mark.e2e]

# Small chunks, so a batch of a few dozen lines is spread over many claims; a small file limit to test it.
SETTINGS = {"CLOWDER_BATCH_CHUNK_LINES": "4", "CLOWDER_BATCH_MAX_FILE_BYTES": str(64 * 1024)}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    saved = {k: os.environ.get(k) for k in SETTINGS}
    os.environ.update(SETTINGS)
    try:
        with up_cluster(tmp_path_factory.mktemp("clowder"), wide_console=False) as cluster:
            yield cluster
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture(scope="module")
def client(cluster):
    return openai.OpenAI(base_url=f"http://127.0.0.1:{cluster.http_port}/v1", api_key="unused", timeout=60,
                         max_retries=0)


def test_batch_runs_every_line_once_and_reports_unknown_models_in_the_error_file(client):
    lines = chat_lines(9) + chat_lines(1, model="no-such-model", prefix="ghost")
    source = upload(client, lines)
    assert (source.object, source.purpose, source.bytes, source.filename) == ("file", "batch", len(jsonl(lines)),
                                                                             "input.jsonl")
    assert client.files.retrieve(source.id).id == source.id
    assert client.files.content(source.id).content == jsonl(lines)

    batch = client.batches.create(input_file_id=source.id, endpoint="/v1/chat/completions", completion_window="24h",
                                  metadata={"team": "tests"})
    assert batch.status in ("validating", "in_progress") and batch.metadata == {"team": "tests"}
    assert batch.request_counts.total in (0, 10)
    done = ended(client, batch.id)
    assert done.status == "completed", done
    assert (done.request_counts.total, done.request_counts.completed, done.request_counts.failed) == (10, 9, 1)
    assert done.in_progress_at and done.finalizing_at and done.completed_at and done.output_file_id

    output = lines_of(client, done.output_file_id)
    assert sorted(custom_ids(output)) == sorted(f"req-{i}" for i in range(9))
    for line in output:
        assert line["id"].startswith("batch_req_") and line["error"] is None
        response = line["response"]
        assert response["status_code"] == 200 and response["request_id"]
        body = response["body"]
        assert body["object"] == "chat.completion" and body["model"] == "smol"
        assert body["choices"][0]["message"]["content"] and 0 < body["usage"]["completion_tokens"] <= 8

    errors = lines_of(client, done.error_file_id)
    assert custom_ids(errors) == ["ghost-0"]
    response = errors[0]["response"]
    assert response["status_code"] == 404 and errors[0]["error"] is None
    assert response["body"]["error"]["code"] == "model_not_found"

    out_file = client.files.retrieve(done.output_file_id)
    assert out_file.purpose == "batch_output" and out_file.bytes == len(client.files.content(out_file.id).content)
    assert batch.id in [b.id for b in client.batches.list(limit=100).data]
    assert {source.id, done.output_file_id, done.error_file_id} <= {f.id for f in client.files.list().data}

    deleted = client.files.delete(source.id)
    assert deleted.deleted and deleted.id == source.id
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(source.id)


def test_malformed_input_fails_the_batch_with_errors_per_line(client):
    good = chat_lines(2)
    duplicate = dict(good[0])
    wrong_url = {**chat_lines(1, prefix="url")[0], "url": "/v1/completions"}
    no_model = {"custom_id": "nomodel", "method": "POST", "url": "/v1/chat/completions", "body": {"messages": []}}
    content = jsonl(good + [duplicate, wrong_url, no_model]) + b"{not json\n"
    source = client.files.create(file=("bad.jsonl", content), purpose="batch")
    batch = client.batches.create(input_file_id=source.id, endpoint="/v1/chat/completions", completion_window="24h")
    failed = poll(client, batch.id, lambda b: b.status == "failed", 30, "failed")
    found = {(e.line, e.code, e.param) for e in failed.errors.data}
    assert found == {(3, "duplicate_custom_id", "custom_id"), (4, "mismatched_url", "url"),
                     (5, "missing_required_parameter", "body.model"), (6, "invalid_json_line", None)}
    assert failed.failed_at and failed.output_file_id is None and failed.request_counts.completed == 0


def test_requests_that_are_wrong_as_a_whole_get_400_or_404(client):
    source = upload(client, chat_lines(1))
    with pytest.raises(openai.BadRequestError) as err:
        client.batches.create(input_file_id=source.id, endpoint="/v1/images", completion_window="24h")
    assert err.value.body["param"] == "endpoint"
    with pytest.raises(openai.BadRequestError) as err:
        client.batches.create(input_file_id=source.id, endpoint="/v1/chat/completions", completion_window="1h")
    assert err.value.body["param"] == "completion_window"
    with pytest.raises(openai.NotFoundError):
        client.batches.create(input_file_id="file-missing", endpoint="/v1/chat/completions", completion_window="24h")
    with pytest.raises(openai.NotFoundError):
        client.batches.retrieve("batch_missing")
    with pytest.raises(openai.BadRequestError) as err:
        client.files.create(file=("big.jsonl", b"x" * (64 * 1024 + 1)), purpose="batch")
    assert err.value.body["code"] == "file_too_large"
    with pytest.raises(openai.BadRequestError) as err:
        client.files.create(file=("a.jsonl", b"{}"), purpose="fine-tune")
    assert err.value.body["param"] == "purpose"


def test_cancel_midway_keeps_finished_results_and_runs_nothing_more(client):
    total = 40
    source = upload(client, chat_lines(total, max_tokens=24))
    batch = client.batches.create(input_file_id=source.id, endpoint="/v1/chat/completions", completion_window="24h")
    poll(client, batch.id, lambda b: b.request_counts.completed >= 1, 120, "partly done")
    cancelling = client.batches.cancel(batch.id)
    assert cancelling.status in ("cancelling", "cancelled") and cancelling.cancelling_at
    done = ended(client, batch.id)
    assert done.status == "cancelled" and done.cancelled_at
    output = lines_of(client, done.output_file_id)
    ids = custom_ids(output)
    assert 1 <= len(ids) < total and len(set(ids)) == len(ids)
    assert all(line["response"]["status_code"] == 200 for line in output)
    assert done.request_counts.completed == len(ids) and done.request_counts.total == total
    with pytest.raises(openai.BadRequestError):
        client.batches.cancel(batch.id)


def _all_answered_once(client, done, total: int) -> None:
    assert done.status == "completed", done
    output, errors = lines_of(client, done.output_file_id), lines_of(client, done.error_file_id)
    assert errors == [], errors[:3]
    counts = collections.Counter(custom_ids(output))
    assert counts == collections.Counter(f"req-{i}" for i in range(total)), counts
    assert (done.request_counts.completed, done.request_counts.failed) == (total, 0)


# Three waves of the demo's slots: the batch is still running when its first results are seen.
MID_BATCH_LINES = 3 * DEMO_SLOTS


def _partly_done(client, total: int):
    source = upload(client, chat_lines(total, max_tokens=16))
    batch = client.batches.create(input_file_id=source.id, endpoint="/v1/chat/completions", completion_window="24h")
    seen = poll(client, batch.id, lambda b: 1 <= b.request_counts.completed, 120, "partly done")
    assert seen.status == "in_progress" and seen.request_counts.completed < total, seen
    return batch


def test_balancer_killed_mid_batch_resumes_with_nothing_lost_or_duplicated(cluster, client):
    total = MID_BATCH_LINES
    batch = _partly_done(client, total)
    old = cluster.component("balancer")
    killed_at = int(time.time())
    os.kill(old["pid"], signal.SIGKILL)
    cluster.wait_component("balancer", lambda c: c["state"] == "running" and c["pid"] != old["pid"], timeout=90)
    done = ended(client, batch.id)
    # Finished after the kill: the restarted balancer (its claims' lease gone) took the rest up.
    assert done.finalizing_at >= killed_at, done
    _all_answered_once(client, done, total)


def test_runtime_killed_mid_batch_resumes_with_nothing_lost_or_duplicated(cluster, client):
    total = MID_BATCH_LINES
    before = smol_replica(cluster)
    batch = _partly_done(client, total)
    killed_at = int(time.time())
    os.kill(before.pid, signal.SIGKILL)
    done = ended(client, batch.id)
    assert done.finalizing_at >= killed_at, done
    _all_answered_once(client, done, total)
    assert smol_replica(cluster).pid != before.pid


def test_grpc_batch_service_serves_the_same_objects(cluster, client):
    source = upload(client, chat_lines(1))
    info = json.loads((cluster.data_dir / "cluster.json").read_text())
    with grpc.insecure_channel(info["balancer_grpc"]) as channel:
        stub = batch_pb2_grpc.BatchServiceStub(channel)
        assert stub.GetFile(batch_pb2.GetFileRequest(id=source.id), timeout=10).file.bytes == source.bytes
        created = stub.CreateBatch(batch_pb2.CreateBatchRequest(input_file_id=source.id,
                                                                endpoint="/v1/chat/completions"), timeout=10).batch
        assert client.batches.retrieve(created.id).input_file_id == source.id
        with pytest.raises(grpc.RpcError) as err:
            stub.GetBatch(batch_pb2.GetBatchRequest(id="batch_missing"), timeout=10)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert ended(client, created.id).status == "completed"


def test_sdk_and_cli_run_a_batch_and_print_its_results(cluster, tmp_path):
    from clowder.client import Client

    info = json.loads((cluster.data_dir / "cluster.json").read_text())
    with Client(controller=info["controller"], balancer=info["balancer_grpc"], timeout_s=30) as sdk:
        uploaded = sdk.batches.upload(jsonl(chat_lines(2, prefix="sdk")), filename="sdk.jsonl")
        created = sdk.batches.create(uploaded.id, metadata={"via": "sdk"})
        done = sdk.batches.wait(created.id, timeout_s=120, poll_s=0.5)
        assert done.status == batch_pb2.BATCH_STATUS_COMPLETED and done.metadata["via"] == "sdk"
        output, errors = sdk.batches.results(created.id)
        assert sorted(custom_ids(output)) == ["sdk-0", "sdk-1"] and errors == []
        assert created.id in [b.id for b in sdk.batches.list()]

    source = tmp_path / "cli.jsonl"
    source.write_bytes(jsonl(chat_lines(2, prefix="cli")))
    made = cluster.cli("batch", "create", str(source), "--wait")
    assert made.returncode == 0, made.stderr
    assert "completed" in made.stdout and "2 completed, 0 failed" in made.stdout
    batch_id = made.stdout.split("batch ", 1)[1].split(":", 1)[0]
    assert batch_id in cluster.cli("batch", "ls").stdout
    printed = cluster.cli("batch", "results", batch_id)
    assert printed.returncode == 0, printed.stderr
    assert sorted(custom_ids([json.loads(line) for line in printed.stdout.splitlines()])) == ["cli-0", "cli-1"]
    assert "has no error file" in cluster.cli("batch", "results", batch_id, "--errors").stderr
    refused = cluster.cli("batch", "cancel", batch_id)
    assert refused.returncode != 0 and "Cannot cancel" in refused.stdout + refused.stderr


def test_each_invocation_runs_under_the_creators_key_and_counts_in_its_usage(cluster, client):
    from clowder.balancer.v1 import apikeys_pb2
    from clowder.client import Client
    from clowder_common.auth import read_admin_token

    info = json.loads((cluster.data_dir / "cluster.json").read_text())
    with Client(controller=info["controller"], balancer=info["balancer_grpc"],
                admin_token=read_admin_token(cluster.data_dir), timeout_s=30) as admin:
        record, secret = admin.api_keys.create("batch owner", ["batchers"])
        keyed = openai.OpenAI(base_url=f"http://127.0.0.1:{cluster.http_port}/v1", api_key=secret, timeout=60,
                              max_retries=0)
        source = upload(keyed, chat_lines(3, prefix="keyed"))
        batch = keyed.batches.create(input_file_id=source.id, endpoint="/v1/chat/completions",
                                     completion_window="24h")
        # Another caller (here the anonymous one) sees neither the key's file nor its batch.
        with pytest.raises(openai.NotFoundError):
            client.batches.retrieve(batch.id)
        with pytest.raises(openai.NotFoundError):
            client.files.retrieve(source.id)
        done = ended(keyed, batch.id, timeout=120)
        assert done.status == "completed", done
        output = lines_of(keyed, done.output_file_id)
        tokens = sum(line["response"]["body"]["usage"]["completion_tokens"] for line in output)
        # Usage is flushed to etcd every couple of seconds: each invocation is one request of this key.
        deadline = time.monotonic() + 30
        usage = None
        while time.monotonic() < deadline:
            usage = admin.api_keys.usage(apikeys_pb2.GetUsageRequest(key=record.id))
            if usage.requests >= 3:
                break
            time.sleep(0.5)
        assert usage is not None and (usage.requests, usage.completion_tokens) == (3, tokens), usage
        assert {g for r in usage.records for g in r.groups} == {"batchers"}


def _batch_requests(http_port: int) -> int:
    """Batch invocations a balancer has answered with 200, from its /metrics."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{http_port}/metrics", timeout=10).read().decode()
    found = re.findall(r'^clowder_balancer_requests_total\{([^}]*)\} ([0-9.e+]+)$', text, re.M)
    return int(sum(float(v) for labels, v in found if 'api="batch"' in labels and 'status="200"' in labels))


def test_two_balancers_share_a_batch_and_run_each_line_once(cluster, client, tmp_path):
    info = json.loads((cluster.data_dir / "cluster.json").read_text())
    port = free_port()
    # The credentials `clowder up` gives its own balancer: admin token (storage) and service token (runtimes).
    env = {**os.environ, TOKEN_ENV: read_admin_token(cluster.data_dir) or "",
           SERVICE_TOKEN_ENV: service_token_path(cluster.data_dir).read_text().strip()}
    with open(tmp_path / "second-balancer.log", "wb") as log:
        second = subprocess.Popen(
            [sys.executable, "-m", "clowder_balancer", "--name", "second", "--http-listen", f"127.0.0.1:{port}",
             "--grpc-listen", "127.0.0.1:0", "--etcd-endpoints", info["etcd"], "--etcd-prefix", "/clowder/",
             "--controller-address", info["controller"]], stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        wait_for_port("127.0.0.1", port, timeout=60, proc=second)
        before = {p: _batch_requests(p) for p in (cluster.http_port, port)}
        total = 24
        source = upload(client, chat_lines(total, max_tokens=8))
        batch = client.batches.create(input_file_id=source.id, endpoint="/v1/chat/completions",
                                      completion_window="24h")
        done = ended(client, batch.id)
        _all_answered_once(client, done, total)
        ran = {p: _batch_requests(p) - before[p] for p in before}
        # Claims split the chunks (4 lines each here): both balancers ran lines, and no line ran twice.
        assert sum(ran.values()) == total and all(ran.values()), ran
    finally:
        second.terminate()
        second.wait(30)


def test_expiry_keeps_finished_results_and_marks_the_rest_batch_expired(cluster, client):
    import asyncio

    from clowder_balancer.batch.store import BatchStore
    from clowder_common.etcd import EtcdState

    total = 40
    source = upload(client, chat_lines(total, max_tokens=24))
    batch = client.batches.create(input_file_id=source.id, endpoint="/v1/chat/completions", completion_window="24h")
    poll(client, batch.id, lambda b: 1 <= b.request_counts.completed, 120, "partly done")

    async def window_ends_now() -> None:
        # 24 hours are too long to wait: the window's end is moved to now, in etcd, as time would.
        info = json.loads((cluster.data_dir / "cluster.json").read_text())
        state = EtcdState([info["etcd"]], "/clowder/")
        await state.connect()
        try:
            def end(b: batch_pb2.Batch) -> bool:
                b.expires_at = int(time.time()) - 1
                return True
            await BatchStore(state).mutate(batch.id, end)
        finally:
            await state.close()

    asyncio.run(window_ends_now())
    done = ended(client, batch.id)
    assert done.status == "expired" and done.expired_at, done
    output, errors = lines_of(client, done.output_file_id), lines_of(client, done.error_file_id)
    assert output and all(line["response"]["status_code"] == 200 for line in output)
    expired = [line for line in errors if line["error"] and line["error"]["code"] == "batch_expired"]
    assert expired and all(line["response"] is None for line in expired)
    assert sorted(custom_ids(output + errors)) == sorted(f"req-{i}" for i in range(total))
    assert (done.request_counts.completed, done.request_counts.failed) == (len(output), len(errors))
