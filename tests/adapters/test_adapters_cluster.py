"""Adapters added to and removed from a running deployment of a real cluster (`clowder up --demo`): the controller
has the node's storage pull the GGUF and the runtime load it without a restart; the balancer routes to it."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time

import aiohttp
import grpc
import openai
import pytest
from clowder.controller.v1 import adapters_pb2, adapters_pb2_grpc
from runtime_lora import write_lora_adapter

from clowder_common.auth import bearer_metadata, read_admin_token
from clowder_common.errors import from_rpc_error
from clowder_runtime.app import create_runtime
from clowder_runtime.config import RuntimeConfig

from cluster_helpers import up_cluster

pytestmark = pytest.mark.processes

MODEL = "smol"
PROMPT = "The sky is"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with up_cluster(tmp_path_factory.mktemp("clowder"), wide_console=False) as cluster:
        cluster.wait_for(f"ready: model {MODEL}", timeout=300)
        yield cluster


@pytest.fixture(scope="module")
def lora(tmp_path_factory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("lora")
    noise = folder / "noise.gguf"
    noise.write_bytes(b"no GGUF in here" * 64)
    return {"pirate": str(write_lora_adapter(folder / "pirate.gguf", seed=0)), "noise": str(noise)}


@pytest.fixture(scope="module")
async def controller(cluster):
    info = json.loads((cluster.data_dir / "cluster.json").read_text())
    metadata = bearer_metadata(read_admin_token(cluster.data_dir))
    async with grpc.aio.insecure_channel(info["controller"]) as channel:
        yield adapters_pb2_grpc.AdapterServiceStub(channel), metadata


@pytest.fixture(scope="module")
async def client(cluster):
    async with openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{cluster.http_port}/v1", api_key="unused",
                                  timeout=180, max_retries=0) as client:
        yield client


@pytest.fixture(scope="module")
async def reference(model_path, lora):
    """What the adapter must produce: a runtime started with it (--adapter), same model."""
    app = await create_runtime(RuntimeConfig(model_path=str(model_path), threads=1, slots=2,
                                             adapters=(f"pirate={lora['pirate']}",)))
    await app.start()
    yield app
    await app.stop()


async def reference_text(reference, max_tokens: int, adapter: str = "pirate") -> str:
    from clowder.runtime.v1 import runtime_pb2, runtime_pb2_grpc

    async with grpc.aio.insecure_channel(f"127.0.0.1:{reference.port}") as channel:
        stub = runtime_pb2_grpc.RuntimeServiceStub(channel)
        request = runtime_pb2.GenerateRequest(request_id="ref", prompt=PROMPT, sampling=runtime_pb2.SamplingParams(
            temperature=0, max_tokens=max_tokens, adapter=adapter))
        return "".join([r.text async for r in stub.Generate(request, timeout=120)])


async def complete(client, max_tokens: int = 24, adapter: str = "") -> str:
    extra = {"adapter": adapter} if adapter else None
    reply = await client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=max_tokens, temperature=0,
                                            extra_body=extra)
    return reply.choices[0].text


class Stream:
    """A streamed completion in the background: `first` once text came, `text` and `finish` at the end."""

    def __init__(self, client, max_tokens: int, adapter: str = "") -> None:
        self.first = asyncio.Event()
        self.text = ""
        self.finish = ""
        self.task = asyncio.create_task(self._run(client, max_tokens, adapter))

    async def _run(self, client, max_tokens: int, adapter: str) -> None:
        stream = await client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=max_tokens, temperature=0,
                                                 stream=True, extra_body={"adapter": adapter} if adapter else None)
        async for chunk in stream:
            for choice in chunk.choices:
                self.text += choice.text
                if choice.text:
                    self.first.set()
                self.finish = choice.finish_reason or self.finish


async def adapter_status(controller, name: str) -> adapters_pb2.Adapter:
    stub, metadata = controller
    reply = await stub.GetAdapter(adapters_pb2.GetAdapterRequest(deployment=MODEL, name=name), metadata=metadata,
                                  timeout=10)
    return reply.adapter


async def wait_status(controller, name: str, check, what: str, timeout: float = 120) -> adapters_pb2.Adapter:
    deadline = time.monotonic() + timeout
    while True:
        status = await adapter_status(controller, name)
        if check(status):
            return status
        assert time.monotonic() < deadline, f"{what}: {status}"
        await asyncio.sleep(0.1)


async def test_an_adapter_added_to_a_running_deployment_is_used_by_the_next_request_with_no_stream_broken(
        cluster, controller, client, reference, lora):
    stub, metadata = controller
    base = await complete(client)
    expected = await reference_text(reference, 24)
    assert expected != base
    long_alone = await complete(client, max_tokens=200)

    stream = Stream(client, 200)
    await asyncio.wait_for(stream.first.wait(), 60)
    created = await stub.CreateAdapter(adapters_pb2.CreateAdapterRequest(adapter=adapters_pb2.Adapter(
        deployment=MODEL, name="pirate", source_url=f"file://{lora['pirate']}")), metadata=metadata, timeout=10)
    assert created.adapter.name == "pirate" and created.adapter.create_time.seconds > 0
    status = await wait_status(controller, "pirate", lambda a: a.ready_replicas and a.loaded_replicas == a.ready_replicas,
                               "never loaded on every ready replica")
    assert status.digest.startswith("sha256:") and not status.message
    # The next request uses it: the text of a runtime started with the adapter.
    assert await complete(client, adapter="pirate") == expected
    assert await complete(client) == base
    await asyncio.wait_for(stream.task, 180)
    # The stream that ran across the load was not broken, nor changed.
    assert (stream.finish, stream.text) == ("length", long_alone)
    listed = await stub.ListAdapters(adapters_pb2.ListAdaptersRequest(deployment=MODEL), metadata=metadata,
                                     timeout=10)
    assert [a.name for a in listed.adapters] == ["pirate"]


async def test_a_replica_that_starts_again_comes_back_with_the_adapter(cluster, controller, client, reference):
    before = {r.id: r.pid for r in cluster.control().deployments.replicas(MODEL)}
    assert before and all(before.values())
    for pid in before.values():
        os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 180
    while True:
        replicas = cluster.control().deployments.replicas(MODEL)
        if replicas and all(r.pid and r.pid != before.get(r.id) and r.endpoint for r in replicas):
            break
        assert time.monotonic() < deadline, f"the replicas did not start again: {replicas}"
        await asyncio.sleep(0.2)
    await wait_status(controller, "pirate", lambda a: a.ready_replicas and a.loaded_replicas == a.ready_replicas,
                      "the restarted replica never got the adapter")
    assert await complete(client, adapter="pirate") == await reference_text(reference, 24)


async def test_removing_an_adapter_lets_its_running_stream_finish_then_requests_for_it_are_refused(
        cluster, controller, client, reference):
    stub, metadata = controller
    expected_long = await reference_text(reference, 200)
    stream = Stream(client, 200, adapter="pirate")
    await asyncio.wait_for(stream.first.wait(), 60)
    await stub.DeleteAdapter(adapters_pb2.DeleteAdapterRequest(deployment=MODEL, name="pirate"), metadata=metadata,
                             timeout=10)
    await asyncio.wait_for(stream.task, 180)
    assert (stream.finish, stream.text) == ("length", expected_long)
    with pytest.raises(grpc.aio.AioRpcError) as gone:
        await adapter_status(controller, "pirate")
    assert gone.value.code() == grpc.StatusCode.NOT_FOUND
    # Once the replicas unloaded it, the balancer has no replica for it.
    deadline = time.monotonic() + 60
    while True:
        try:
            await complete(client, adapter="pirate", max_tokens=1)
        except openai.APIStatusError as err:
            assert err.status_code == 503 and "adapter 'pirate'" in str(err)
            break
        assert time.monotonic() < deadline, "the adapter was never unloaded"
        await asyncio.sleep(0.2)
    assert await complete(client) == await complete(client)


async def test_the_cli_and_the_sdk_add_list_and_remove_an_adapter(cluster, client, reference, lora):
    added = await asyncio.to_thread(cluster.cli, "adapter", "add", MODEL, "cli-pirate", lora["pirate"])
    assert added.returncode == 0, added.stdout + added.stderr
    assert "adapter cli-pirate loaded on 1/1 replicas of smol (sha256:" in added.stdout
    listed = await asyncio.to_thread(cluster.cli, "adapter", "ls", MODEL)
    assert listed.returncode == 0 and "cli-pirate" in listed.stdout and "1/1" in listed.stdout, listed.stdout
    # Another name over the same weights: the same text.
    assert await complete(client, adapter="cli-pirate") == await reference_text(reference, 24)
    control = cluster.control()
    assert [(a.name, a.loaded_replicas) for a in control.adapters.list(MODEL)] == [("cli-pirate", 1)]
    # And over REST, through the balancer's gateway.
    async with aiohttp.ClientSession() as http:
        async with http.get(f"http://127.0.0.1:{cluster.http_port}/api/v1/deployments/{MODEL}/adapters",
                            headers={"Authorization": f"Bearer {read_admin_token(cluster.data_dir)}"}) as reply:
            assert reply.status == 200, await reply.text()
            body = await reply.json()
    assert [(a["name"], a["loadedReplicas"], a["readyReplicas"]) for a in body["adapters"]] == [("cli-pirate", 1, 1)]
    removed = await asyncio.to_thread(cluster.cli, "adapter", "rm", MODEL, "cli-pirate")
    assert removed.returncode == 0, removed.stdout + removed.stderr
    assert control.adapters.list(MODEL) == []
    missing = await asyncio.to_thread(cluster.cli, "adapter", "rm", MODEL, "cli-pirate")
    assert missing.returncode == 1 and "NOT_FOUND" in missing.stdout


async def test_bad_adapters_are_refused_naming_the_field(cluster, controller, lora):
    stub, metadata = controller

    async def refusal(adapter: adapters_pb2.Adapter) -> tuple[grpc.StatusCode, str]:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.CreateAdapter(adapters_pb2.CreateAdapterRequest(adapter=adapter), metadata=metadata,
                                     timeout=10)
        error = from_rpc_error(caught.value)
        return caught.value.code(), error.violations[0].field if error.violations else ""

    source = f"file://{lora['pirate']}"
    invalid = grpc.StatusCode.INVALID_ARGUMENT
    assert await refusal(adapters_pb2.Adapter(deployment=MODEL, name="Bad Name", source_url=source)) == (
        invalid, "adapter.name")
    assert await refusal(adapters_pb2.Adapter(deployment=MODEL, name="x", source_url="ftp://h/a.gguf")) == (
        invalid, "adapter.source_url")
    assert await refusal(adapters_pb2.Adapter(deployment=MODEL, name="x", source_url=source, digest="sha256:1")) == (
        invalid, "adapter.digest")
    assert (await refusal(adapters_pb2.Adapter(deployment="nope", name="x", source_url=source)))[0] == (
        grpc.StatusCode.NOT_FOUND)
    await stub.CreateAdapter(adapters_pb2.CreateAdapterRequest(adapter=adapters_pb2.Adapter(
        deployment=MODEL, name="noise", source_url=f"file://{lora['noise']}")), metadata=metadata, timeout=10)
    assert (await refusal(adapters_pb2.Adapter(deployment=MODEL, name="noise", source_url=source)))[0] == (
        grpc.StatusCode.ALREADY_EXISTS)
    # A file llama.cpp cannot load: the adapter says why, and no replica lists it.
    status = await wait_status(controller, "noise", lambda a: a.message, "the failure was never recorded")
    assert "cannot load" in status.message and status.loaded_replicas == 0
    await stub.DeleteAdapter(adapters_pb2.DeleteAdapterRequest(deployment=MODEL, name="noise"), metadata=metadata,
                             timeout=10)


async def test_deleting_the_deployment_removes_its_adapters(cluster, controller, lora):
    """Last: it removes the deployment the other tests use."""
    stub, metadata = controller
    await stub.CreateAdapter(adapters_pb2.CreateAdapterRequest(adapter=adapters_pb2.Adapter(
        deployment=MODEL, name="orphan", source_url=f"file://{lora['pirate']}")), metadata=metadata, timeout=10)
    removed = await asyncio.to_thread(cluster.cli, "undeploy", MODEL)
    assert removed.returncode == 0, removed.stdout + removed.stderr
    deadline = time.monotonic() + 60
    while (await stub.ListAdapters(adapters_pb2.ListAdaptersRequest(deployment=MODEL), metadata=metadata,
                                   timeout=10)).adapters:
        assert time.monotonic() < deadline, "the deleted deployment's adapter stayed"
        await asyncio.sleep(0.2)
