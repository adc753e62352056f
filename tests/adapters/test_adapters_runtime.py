"""A running replica loads and unloads LoRA adapters (AdapterService) without a restart or a broken stream."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest
from clowder.runtime.v1 import adapters_pb2, adapters_pb2_grpc, runtime_pb2, runtime_pb2_grpc
from runtime_lora import write_lora_adapter

from clowder_common import keys
from clowder_common.errors import InvalidArgument, from_rpc_error
from clowder_runtime.app import create_runtime
from clowder_runtime.config import RuntimeConfig

pytestmark = pytest.mark.inprocess

CONTEXT_SIZE = 512
GRACE_S = 0.5
PROMPT = "The sky is"


@pytest.fixture(scope="module")
def lora_files(tmp_path_factory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("lora")
    return {
        "pirate": str(write_lora_adapter(folder / "pirate.gguf", seed=0)),
        "parrot": str(write_lora_adapter(folder / "parrot.gguf", seed=1)),
    }


def _config(model_path, **extra) -> RuntimeConfig:
    return RuntimeConfig(model_path=str(model_path), context_size=CONTEXT_SIZE, threads=1, slots=4,
                         adapter_unload_grace_s=GRACE_S, **extra)


@pytest.fixture(scope="module")
async def reference(model_path, lora_files):
    """A replica started with both adapters (--adapter): what a loaded adapter must produce."""
    app = await create_runtime(_config(model_path, adapters=tuple(f"{n}={p}" for n, p in lora_files.items())))
    await app.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
        yield runtime_pb2_grpc.RuntimeServiceStub(channel)
    await app.stop()


@pytest.fixture
async def live(model_path, etcd, etcd_prefix):
    """A replica started with no adapter, registered in etcd."""
    app = await create_runtime(_config(model_path, etcd_endpoints=(etcd.endpoint,), etcd_prefix=etcd_prefix,
                                       deployment="smol", replica_id="r0"))
    await app.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
        yield app, runtime_pb2_grpc.RuntimeServiceStub(channel), adapters_pb2_grpc.AdapterServiceStub(channel)
    await app.stop()


def completion(adapter: str = "", max_tokens: int = 24) -> runtime_pb2.GenerateRequest:
    return runtime_pb2.GenerateRequest(request_id="t", prompt=PROMPT, sampling=runtime_pb2.SamplingParams(
        temperature=0, max_tokens=max_tokens, adapter=adapter))


async def generate(stub, request, timeout: float = 120) -> tuple[str, runtime_pb2.GenerateResponse]:
    responses = [r async for r in stub.Generate(request, timeout=timeout)]
    return "".join(r.text for r in responses), responses[-1]


async def registered_adapters(state, etcd_prefix) -> list[str]:
    found = await state.get(etcd_prefix + keys.endpoint("smol", "r0"), runtime_pb2.Endpoint)
    assert found is not None
    return [a.name for a in found.value.adapters]


class Streaming:
    """A long generation running in the background; `first` is set once its first text arrived."""

    def __init__(self, stub, request) -> None:
        self.first = asyncio.Event()
        self.messages: list[runtime_pb2.GenerateResponse] = []
        self.task = asyncio.create_task(self._run(stub, request))
        self.ended_at = 0.0

    async def _run(self, stub, request) -> None:
        async for message in stub.Generate(request, timeout=180):
            self.messages.append(message)
            if message.text:
                self.first.set()
        self.ended_at = time.monotonic()

    @property
    def text(self) -> str:
        return "".join(m.text for m in self.messages)


async def test_an_adapter_loaded_while_a_stream_runs_is_used_by_the_next_request_and_the_stream_is_untouched(
        live, reference, lora_files, state, etcd_prefix):
    app, stub, adapters = live
    long_request = completion(max_tokens=160)
    alone, _ = await generate(stub, long_request)
    base, _ = await generate(stub, completion())
    expected, _ = await generate(reference, completion("pirate"))
    assert expected != base

    stream = Streaming(stub, long_request)
    await asyncio.wait_for(stream.first.wait(), 60)
    reply = await adapters.LoadAdapter(adapters_pb2.LoadAdapterRequest(name="pirate", path=lora_files["pirate"]),
                                       timeout=60)
    assert reply.loaded and reply.adapter.name == "pirate" and not reply.adapter.fixed
    # Registered before LoadAdapter answers: a balancer watching etcd can route to it at once.
    assert await registered_adapters(state, etcd_prefix) == ["pirate"]
    assert not stream.task.done(), "the stream ended before the load: make it longer"
    tuned, _ = await generate(stub, completion("pirate"))
    assert tuned == expected
    await asyncio.wait_for(stream.task, 120)
    assert stream.messages[-1].finish_reason == runtime_pb2.FINISH_REASON_LENGTH
    # Not broken, not changed: the same text as the same request with nothing else going on.
    assert stream.text == alone
    assert list((await stub.GetStats(runtime_pb2.GetStatsRequest(), timeout=5)).adapters) == ["pirate"]
    listed = await adapters.ListAdapters(adapters_pb2.ListAdaptersRequest(), timeout=5)
    assert [(a.name, a.path) for a in listed.adapters] == [("pirate", lora_files["pirate"])]
    # Asked again (a controller retrying): nothing to do.
    again = await adapters.LoadAdapter(adapters_pb2.LoadAdapterRequest(name="pirate", path=lora_files["pirate"]),
                                       timeout=60)
    assert not again.loaded


async def test_unloading_lets_a_running_stream_finish_then_refuses_and_the_name_can_be_reused(
        live, reference, lora_files, state, etcd_prefix):
    app, stub, adapters = live
    await adapters.LoadAdapter(adapters_pb2.LoadAdapterRequest(name="pirate", path=lora_files["pirate"]), timeout=60)
    long_request = completion("pirate", max_tokens=400)
    expected_long, _ = await generate(reference, long_request)

    stream = Streaming(stub, long_request)
    await asyncio.wait_for(stream.first.wait(), 60)
    unload = asyncio.ensure_future(adapters.UnloadAdapter(adapters_pb2.UnloadAdapterRequest(name="pirate"),
                                                          timeout=180))
    unloaded_at: list[float] = []
    unload.add_done_callback(lambda _: unloaded_at.append(time.monotonic()))
    # Unlisted at once (etcd and GetStats), so balancers stop sending its requests here...
    deadline = time.monotonic() + 10
    while await registered_adapters(state, etcd_prefix) or list(
            (await stub.GetStats(runtime_pb2.GetStatsRequest(), timeout=5)).adapters):
        assert time.monotonic() < deadline, "the adapter stayed listed"
        await asyncio.sleep(0.02)
    # ...and once the grace is over, a new request for it is refused as retryable elsewhere.
    refused = None
    while refused is None and not stream.task.done():
        try:
            await generate(stub, completion("pirate", max_tokens=1))
            await asyncio.sleep(0.05)
        except grpc.aio.AioRpcError as err:
            refused = err
    assert refused is not None, "the stream ended before the grace did: make it longer"
    assert refused.code() == grpc.StatusCode.UNAVAILABLE
    assert from_rpc_error(refused).reason == "ADAPTER_UNLOADING"
    assert not unload.done()
    await asyncio.wait_for(stream.task, 180)
    await asyncio.wait_for(unload, 60)
    # The running stream was never cut: it finished with the adapter's text.
    assert stream.messages[-1].finish_reason == runtime_pb2.FINISH_REASON_LENGTH
    assert stream.text == expected_long
    # Freed only after the last request using it ended.
    assert unloaded_at[0] >= stream.ended_at
    with pytest.raises(grpc.aio.AioRpcError) as gone:
        await generate(stub, completion("pirate"))
    assert gone.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "unknown adapter 'pirate'" in gone.value.details()

    # The name is free again, for another adapter: its requests use the new weights, never the old KV.
    await adapters.LoadAdapter(adapters_pb2.LoadAdapterRequest(name="pirate", path=lora_files["parrot"]), timeout=60)
    parrot, _ = await generate(reference, completion("parrot"))
    assert (await generate(stub, completion("pirate")))[0] == parrot


async def _refusal(call) -> tuple[grpc.StatusCode, str, str]:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    error = from_rpc_error(caught.value)
    return caught.value.code(), (error.violations[0].field if error.violations else ""), caught.value.details()


async def test_bad_adapters_are_refused_naming_the_field(live, lora_files, tmp_path, model_path):
    _, stub, adapters = live
    load = adapters.LoadAdapter
    not_gguf = tmp_path / "noise.gguf"
    not_gguf.write_bytes(b"this is no GGUF file" * 100)
    cases = [
        (adapters_pb2.LoadAdapterRequest(name="x", path=str(tmp_path / "absent.gguf")), "path", "does not exist"),
        (adapters_pb2.LoadAdapterRequest(name="x", path=str(not_gguf)), "path", "cannot load"),
        # A model is no adapter.
        (adapters_pb2.LoadAdapterRequest(name="x", path=str(model_path)), "path", "cannot load"),
        (adapters_pb2.LoadAdapterRequest(name="Bad Name", path=lora_files["pirate"]), "name", "not a valid name"),
        (adapters_pb2.LoadAdapterRequest(name="x"), "path", "path or its storage digest"),
        (adapters_pb2.LoadAdapterRequest(name="x", digest="sha256:abc"), "digest", "sha256"),
    ]
    for request, field, words in cases:
        code, named, details = await _refusal(load(request, timeout=60))
        assert (code, named) == (grpc.StatusCode.INVALID_ARGUMENT, field), (request, details)
        assert words in details
    await load(adapters_pb2.LoadAdapterRequest(name="pirate", path=lora_files["pirate"]), timeout=60)
    code, named, details = await _refusal(load(adapters_pb2.LoadAdapterRequest(name="pirate",
                                                                                path=lora_files["parrot"]), timeout=60))
    assert (code, named) == (grpc.StatusCode.INVALID_ARGUMENT, "name") and "already loaded" in details
    code, _, _ = await _refusal(adapters.UnloadAdapter(adapters_pb2.UnloadAdapterRequest(name="nope"), timeout=10))
    assert code == grpc.StatusCode.NOT_FOUND
    # Refusals left nothing behind, and the replica serves on.
    listed = await adapters.ListAdapters(adapters_pb2.ListAdaptersRequest(), timeout=5)
    assert [a.name for a in listed.adapters] == ["pirate"]
    text, last = await generate(stub, completion("pirate"))
    assert text and last.finish_reason != runtime_pb2.FINISH_REASON_UNSPECIFIED


async def test_max_adapters_bounds_what_a_replica_holds(model_path, lora_files):
    app = await create_runtime(_config(model_path, max_adapters=2, adapters=(f"pirate={lora_files['pirate']}",)))
    await app.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
            adapters = adapters_pb2_grpc.AdapterServiceStub(channel)
            await adapters.LoadAdapter(adapters_pb2.LoadAdapterRequest(name="parrot", path=lora_files["parrot"]),
                                       timeout=60)
            with pytest.raises(grpc.aio.AioRpcError) as full:
                await adapters.LoadAdapter(adapters_pb2.LoadAdapterRequest(name="third", path=lora_files["parrot"]),
                                           timeout=60)
            assert full.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "max_adapters 2" in full.value.details()
            # A fixed adapter (given at start) can be unloaded by hand too; that makes room.
            await adapters.UnloadAdapter(adapters_pb2.UnloadAdapterRequest(name="pirate"), timeout=60)
            await adapters.LoadAdapter(adapters_pb2.LoadAdapterRequest(name="third", path=lora_files["parrot"]),
                                       timeout=60)
            listed = await adapters.ListAdapters(adapters_pb2.ListAdaptersRequest(), timeout=5)
            assert [(a.name, a.fixed) for a in listed.adapters] == [("parrot", False), ("third", False)]
    finally:
        await app.stop()
    with pytest.raises(InvalidArgument) as too_many:
        await create_runtime(_config(model_path, max_adapters=1, adapters=tuple(
            f"{n}={p}" for n, p in lora_files.items())))
    assert too_many.value.violations[0].field == "adapters"
