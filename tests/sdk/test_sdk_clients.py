"""The SDK's sync and asyncio clients against real in-process services and a real runtime of the bundled model."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import pathlib
import sys

import pytest

from clowder.client import (AlreadyExists, AsyncClient, Client, Completion, FailedPrecondition, InvalidArgument,
                            NotFound, Unauthenticated)
from clowder.controller.v1 import resources_pb2

from sdk_helpers import CHAT, MODEL, TOKEN
from helpers.wait import wait_for

pytestmark = pytest.mark.processes

UNKNOWN_KEY = "ck-" + "0" * 12 + "-" + "A" * 43
EXAMPLE = pathlib.Path(__file__).resolve().parents[2] / "libs" / "sdk" / "examples" / "quickstart.py"


@pytest.fixture
async def aclient(cluster):
    async with AsyncClient(cluster.controller, cluster.balancer, admin_token=TOKEN, timeout_s=60) as client:
        yield client


async def test_async_images_crud_paging_pull_and_errors(aclient, cluster, tmp_path):
    layer = tmp_path / "layer.gguf"
    data = os.urandom(2 * 1024 * 1024)
    layer.write_bytes(data)
    for alias in ("zz-b", "zz-a", "zz-c"):
        created = await aclient.images.create(alias, layer.as_uri(), {"system_prompt": "Be brief.", "context_size": 512})
        assert created.alias == alias and created.configuration.context_size == 512
    page = await aclient.images.list_page(page_size=2)
    assert len(page.images) == 2 and page.next_page_token
    aliases = [i.alias async for i in aclient.images.list(page_size=1)]
    assert aliases == sorted(aliases) and {"zz-a", "zz-b", "zz-c", MODEL} <= set(aliases)

    with pytest.raises(AlreadyExists):
        await aclient.images.create("zz-a", layer.as_uri())
    with pytest.raises(InvalidArgument) as bad:
        await aclient.images.create("Bad Alias", layer.as_uri())
    assert any(v.field.endswith("alias") for v in bad.value.violations)
    with pytest.raises(NotFound) as missing:
        await aclient.images.get("zz-none")
    assert missing.value.reason and "zz-none" in missing.value.message

    progress = [m async for m in aclient.images.pull("zz-a", node=cluster.node)]
    assert progress[-1].blob.digest == "sha256:" + hashlib.sha256(data).hexdigest()
    assert all(m.node == cluster.node for m in progress)
    assert (await aclient.images.get("zz-a")).digest == progress[-1].blob.digest
    with pytest.raises(NotFound):
        [m async for m in aclient.images.pull("zz-none")]

    for alias in ("zz-a", "zz-b", "zz-c"):
        await aclient.images.delete(alias)
    with pytest.raises(NotFound):
        await aclient.images.delete("zz-a")
    with pytest.raises(FailedPrecondition):
        await aclient.images.delete(MODEL)  # still deployed


async def test_async_deployments_and_nodes(aclient, cluster):
    created = await aclient.deployments.create("idle", image=MODEL, replicas=0)
    assert created.name == "idle" and created.image == MODEL
    with pytest.raises(AlreadyExists):
        await aclient.deployments.create("idle", image=MODEL, replicas=0)
    names = [d.name async for d in aclient.deployments.list(page_size=1)]
    assert names == sorted(names) and {"idle", MODEL} <= set(names)
    scaled = await aclient.deployments.scale("idle", 0)
    assert scaled.replicas == 0
    # Runtime settings: set at creation or later, only the named ones change, `clear` unsets.
    tuned = await aclient.deployments.update("idle", slots=8, batch_size=128)
    assert (tuned.slots, tuned.batch_size, tuned.replicas) == (8, 128, 0)
    tuned = await aclient.deployments.update("idle", threads=1, clear=["batch_size"])
    assert (tuned.slots, tuned.threads, tuned.HasField("batch_size")) == (8, 1, False)
    with pytest.raises(InvalidArgument) as err:
        await aclient.deployments.update("idle", slots=0)
    assert err.value.violations[0].field == "deployment.slots"
    with pytest.raises(NotFound):
        await aclient.deployments.scale("ghost", 1)
    ready = await aclient.deployments.wait_ready(MODEL, timeout_s=30)
    assert ready.ready_replicas == 1
    replicas = await aclient.deployments.replicas(MODEL)
    assert [r.state for r in replicas] == [resources_pb2.REPLICA_STATE_READY]
    assert replicas[0].node == cluster.node and replicas[0].endpoint
    assert {r.deployment for r in await aclient.deployments.replicas()} == {MODEL}
    await aclient.deployments.delete("idle")
    with pytest.raises(NotFound):
        await aclient.deployments.get("idle")

    nodes = await aclient.nodes.list()
    assert [n.name for n in nodes] == [cluster.node]
    assert (await aclient.nodes.get(cluster.node)).storage_address == nodes[0].storage_address
    with pytest.raises(NotFound):
        await aclient.nodes.get("nowhere")


async def test_async_inference_whole_and_streamed(aclient):
    models = await aclient.models()
    assert [m.id for m in models] == [MODEL] and models[0].ready_replicas == 1

    answer = await aclient.chat(MODEL, CHAT, max_tokens=12, temperature=0.0, seed=7)
    assert isinstance(answer, Completion) and answer.text.strip()
    assert answer.finish_reason in ("stop", "length") and 0 < answer.usage.completion_tokens <= 12
    assert answer.id.startswith("chatcmpl-") and answer.model == MODEL

    chunks = [c async for c in aclient.chat_stream(MODEL, CHAT, max_tokens=12, temperature=0.0, seed=7)]
    assert len(chunks) > 1 and chunks[-1].finish_reason and chunks[-1].usage is not None
    assert all(c.finish_reason is None for c in chunks[:-1])
    # Same seed and temperature 0: streamed and whole agree.
    assert "".join(c.text for c in chunks) == answer.text

    text = await aclient.complete(MODEL, "The capital of France is", max_tokens=8, temperature=0.0)
    assert text.text and text.usage.prompt_tokens > 0
    pieces = [c.text async for c in aclient.complete_stream(MODEL, "One, two, three,", max_tokens=8, stop=["ten"])]
    assert len(pieces) > 1

    # Leaving a stream early cancels it; the client keeps working.
    stream = aclient.chat_stream(MODEL, CHAT, max_tokens=64)
    async for _ in stream:
        break
    await stream.aclose()
    assert (await aclient.chat(MODEL, CHAT, max_tokens=4)).text

    with pytest.raises(NotFound):
        await aclient.chat("no-such-model", CHAT, max_tokens=4)
    with pytest.raises(TypeError):
        aclient.chat_stream(MODEL, CHAT, max_tokenz=4)


async def test_n_choices_logprobs_and_embeddings(aclient):
    answer = await aclient.chat(MODEL, CHAT, n=3, max_tokens=8, temperature=0.9, seed=11)
    assert [c.index for c in answer.choices] == [0, 1, 2]
    assert all(c.finish_reason in ("stop", "length") for c in answer.choices)
    assert answer.text == answer.choices[0].text
    # Seeds seed+i: the choices are sampled independently, and the same request samples them again.
    again = await aclient.chat(MODEL, CHAT, n=3, max_tokens=8, temperature=0.9, seed=11)
    assert [c.text for c in again.choices] == [c.text for c in answer.choices]
    assert 3 <= answer.usage.completion_tokens <= 24

    scored = await aclient.complete(MODEL, "The capital of France is", max_tokens=5, temperature=0.0,
                                    logprobs=True, top_logprobs=3)
    assert len(scored.logprobs) == scored.usage.completion_tokens
    for entry in scored.logprobs:
        assert entry.logprob <= 0 and len(entry.top) == 3
        # Temperature 0 picks the likeliest token.
        assert entry.top[0].token == entry.token and abs(entry.top[0].logprob - entry.logprob) < 1e-4
    plain = await aclient.complete(MODEL, "The capital of France is", max_tokens=5, temperature=0.0)
    assert plain.logprobs == () and plain.text == scored.text

    vectors = await aclient.embed(MODEL, ["a cat sat on the mat", "a kitten sat on the rug", "tax law of 1920"])
    assert len(vectors.vectors) == 3 and vectors.prompt_tokens > 0
    norms = [sum(v * v for v in vector) ** 0.5 for vector in vectors.vectors]
    assert all(abs(n - 1) < 1e-3 for n in norms)
    cosine = lambda a, b: sum(x * y for x, y in zip(a, b))  # noqa: E731 (unit vectors)
    assert cosine(vectors.vectors[0], vectors.vectors[1]) > cosine(vectors.vectors[0], vectors.vectors[2])
    single = await aclient.embed(MODEL, "a cat sat on the mat")
    assert max(abs(a - b) for a, b in zip(single.vectors[0], vectors.vectors[0])) < 1e-4
    with pytest.raises(InvalidArgument):
        await aclient.embed(MODEL, [])


async def test_api_keys_create_authenticate_list_and_revoke(aclient, cluster):
    record, secret = await aclient.api_keys.create("sdk test", groups=["team-a"])
    assert record.id and secret.startswith("ck-") and record.id in secret
    assert (await aclient.api_keys.get(record.id)).groups == ["team-a"]
    assert record.id in [k.id async for k in aclient.api_keys.list(page_size=1)]

    async with AsyncClient(cluster.controller, cluster.balancer, api_key=secret, timeout_s=60) as user:
        assert (await user.chat(MODEL, CHAT, max_tokens=2)).usage.completion_tokens > 0
        await aclient.api_keys.revoke(record.id)

        async def refused():
            try:
                await user.chat(MODEL, CHAT, max_tokens=2)
            except Unauthenticated:
                return True
            return False

        await wait_for(refused, 10, "the revoked key to be refused")
    with pytest.raises(NotFound):
        await aclient.api_keys.get(record.id)
    # Managing keys takes the admin token, not a user's key.
    async with AsyncClient(cluster.controller, cluster.balancer, admin_token="not-the-token") as stranger:
        with pytest.raises(Unauthenticated):
            await stranger.api_keys.create("nope")


async def test_sync_client_control_plane_and_streaming_inference(cluster, tmp_path):
    layer = tmp_path / "sync.gguf"
    layer.write_bytes(b"sync layer" * 50_000)

    def use_sync_client():
        with Client(cluster.controller, cluster.balancer, admin_token=TOKEN, timeout_s=60) as client:
            client.images.create("sync-img", layer.as_uri())
            assert "sync-img" in [i.alias for i in client.images.list(page_size=1)]
            pulled = list(client.images.pull("sync-img"))
            assert pulled[-1].blob.size_bytes == layer.stat().st_size
            client.deployments.create("sync-idle", image="sync-img", replicas=0)
            assert client.deployments.get("sync-idle").image == "sync-img"
            client.deployments.delete("sync-idle")
            client.images.delete("sync-img")
            with pytest.raises(NotFound):
                client.images.get("sync-img")
            assert [n.name for n in client.nodes.list()] == [cluster.node]

            answer = client.chat(MODEL, CHAT, max_tokens=10, temperature=0.0, seed=1)
            streamed = list(client.chat_stream(MODEL, CHAT, max_tokens=10, temperature=0.0, seed=1))
            assert "".join(c.text for c in streamed) == answer.text and streamed[-1].usage
            assert client.complete(MODEL, "Once upon a time", max_tokens=6).usage.completion_tokens > 0
            assert [m.id for m in client.models()] == [MODEL]
            for _ in client.chat_stream(MODEL, CHAT, max_tokens=64):
                break  # closing the generator cancels the call

    # The services run on this event loop: the blocking client must run beside it.
    await asyncio.to_thread(use_sync_client)


async def test_tokens_come_from_the_environment(cluster, monkeypatch):
    monkeypatch.setenv("CLOWDER_CONTROLLER", cluster.controller)
    monkeypatch.setenv("CLOWDER_BALANCER", cluster.balancer)
    monkeypatch.setenv("CLOWDER_ADMIN_TOKEN", TOKEN)
    # Well-formed but unknown: the balancer must see it and refuse it (an absent key would be anonymous).
    monkeypatch.setenv("CLOWDER_API_KEY", UNKNOWN_KEY)
    async with AsyncClient() as client:
        assert client.settings.controller == cluster.controller and client.settings.balancer == cluster.balancer
        assert MODEL in [i.alias async for i in client.images.list()]
        with pytest.raises(Unauthenticated) as refused:
            await client.chat(MODEL, CHAT, max_tokens=4)
        assert refused.value.reason == "INVALID_API_KEY"
    monkeypatch.delenv("CLOWDER_API_KEY")
    monkeypatch.setenv("CLOWDER_ADMIN_TOKEN", "not-the-token")
    async with AsyncClient() as client:
        assert (await client.chat(MODEL, CHAT, max_tokens=4)).text
        with pytest.raises(Unauthenticated) as err:
            await client.nodes.list()
        assert err.value.reason == "INVALID_TOKEN"


async def test_readme_example_runs_as_written(cluster, tmp_path):
    """As after `make up`: no settings at all, the SDK finds the local cluster's files in its data directory."""
    data_dir = tmp_path / "clowder"
    data_dir.mkdir()
    (data_dir / "cluster.json").write_text(json.dumps({"controller": cluster.controller,
                                                       "balancer_grpc": cluster.balancer}))
    (data_dir / "admin-token").write_text(TOKEN + "\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLOWDER_")}
    env["CLOWDER_DATA_DIR"] = str(data_dir)
    proc = await asyncio.create_subprocess_exec(sys.executable, str(EXAMPLE), env=env, cwd=tmp_path,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    output, _ = await asyncio.wait_for(proc.communicate(), 120)
    text = output.decode()
    assert proc.returncode == 0, text
    assert f"image {MODEL} sha256:" in text and f"deployment {MODEL} 1/1 ready" in text
    assert "tokens," in text
