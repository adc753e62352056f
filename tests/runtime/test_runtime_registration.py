"""Model by digest through a StorageService, endpoint registration in a real etcd, and the drain order on stop."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest
from clowder.runtime.v1 import runtime_pb2, runtime_pb2_grpc
from clowder.storage.v1 import storage_pb2, storage_pb2_grpc

from clowder_common import keys
from clowder_common.errors import FailedPrecondition, InvalidArgument, NotFound, Unauthenticated
from clowder_common.grpc_server import create_grpc_server
from clowder_runtime.app import create_runtime
from clowder_runtime.config import RuntimeConfig
from clowder_runtime.model_source import resolve_model_path

TOKEN = "test-admin-token"
DIGEST = "sha256:" + "ab" * 32


class BlobPaths(storage_pb2_grpc.StorageServiceServicer):
    """Stands in for a node's storage service; only GetBlobPath matters to a runtime."""

    def __init__(self, paths: dict[str, str]) -> None:
        self.paths = paths

    async def GetBlobPath(self, request, context):
        if request.digest not in self.paths:
            raise NotFound(f"blob {request.digest} is not in this store")
        return storage_pb2.GetBlobPathResponse(path=self.paths[request.digest])


@pytest.fixture
async def storage(model_path, tmp_path):
    servicer = BlobPaths({DIGEST: str(model_path), "sha256:" + "cd" * 32: str(tmp_path / "gone.gguf")})

    def register(server):
        storage_pb2_grpc.add_StorageServiceServicer_to_server(servicer, server)
        return storage_pb2.DESCRIPTOR.services_by_name["StorageService"].full_name

    server = create_grpc_server("127.0.0.1:0", [register], admin_token=TOKEN)
    await server.start()
    yield f"127.0.0.1:{server.port}"
    await server.stop(0)


@pytest.mark.inprocess
async def test_model_path_comes_from_storage_with_the_admin_token(storage, model_path):
    assert await resolve_model_path("", DIGEST, storage, TOKEN) == str(model_path)


@pytest.mark.inprocess
@pytest.mark.parametrize(
    ("digest", "token", "error"),
    [
        (DIGEST, "wrong-token", Unauthenticated),
        (DIGEST, None, Unauthenticated),
        ("sha256:" + "ef" * 32, TOKEN, NotFound),
        ("sha256:" + "cd" * 32, TOKEN, FailedPrecondition),  # storage knows it, the file is not there
        ("md5:1234", TOKEN, InvalidArgument),
    ],
)
async def test_storage_failures_come_back_as_their_own_errors(storage, digest, token, error):
    with pytest.raises(error):
        await resolve_model_path("", digest, storage, token)


@pytest.mark.unit
async def test_no_model_location_is_an_invalid_argument():
    with pytest.raises(InvalidArgument):
        await resolve_model_path("", "", "", None)


@pytest.mark.unit
async def test_a_file_that_is_not_a_model_fails_start_with_a_clear_error(tmp_path):
    bogus = tmp_path / "not-a-model.gguf"
    bogus.write_bytes(b"GGUF but not really" * 100)
    app = await create_runtime(RuntimeConfig(model_path=str(bogus), threads=1))
    with pytest.raises(FailedPrecondition, match="cannot load model"):
        await app.start()
    await app.stop()


@pytest.mark.inprocess
@pytest.mark.parametrize(
    ("spec", "message"),
    [("no-equals-sign", "name=path"), ("Bad_Name=x.gguf", "not a valid name"), ("ok=/no/such/file.gguf", "does not exist")],
)
async def test_bad_adapter_specs_are_refused_before_loading(model_path, spec, message):
    with pytest.raises(InvalidArgument, match=message) as caught:
        await create_runtime(RuntimeConfig(model_path=str(model_path), adapters=(spec,)))
    assert caught.value.violations[0].field == "adapters[0]"


@pytest.mark.inprocess
async def test_an_adapter_that_does_not_fit_the_model_fails_start_with_a_clear_error(model_path, tmp_path):
    bogus = tmp_path / "not-an-adapter.gguf"
    bogus.write_bytes(b"GGUF but not really" * 100)
    app = await create_runtime(RuntimeConfig(model_path=str(model_path), threads=1, adapters=(f"a={bogus}",)))
    with pytest.raises(FailedPrecondition, match="LoRA adapter 'a'"):
        await app.start()
    await app.stop()


@pytest.mark.inprocess
async def test_registration_requires_valid_names(etcd, model_path):
    config = RuntimeConfig(model_path=str(model_path), etcd_endpoints=(etcd.endpoint,), deployment="", replica_id="r1")
    with pytest.raises(InvalidArgument):
        await create_runtime(config)


@pytest.mark.inprocess
async def test_endpoint_is_registered_then_withdrawn_before_running_generations_finish(
    etcd, etcd_prefix, state, storage
):
    config = RuntimeConfig(
        digest=DIGEST,
        storage_address=storage,
        etcd_endpoints=(etcd.endpoint,),
        etcd_prefix=etcd_prefix,
        deployment="smol",
        replica_id="r7",
        node="node-a",
        context_size=512,
        threads=1,
    )
    app = await create_runtime(config, admin_token=TOKEN)
    await app.start()
    key = state.key(keys.endpoint("smol", "r7"))
    try:
        stored = await state.get(key, runtime_pb2.Endpoint)
        assert stored is not None
        assert stored.value == runtime_pb2.Endpoint(
            deployment="smol", replica_id="r7", address=f"127.0.0.1:{app.port}", node="node-a", image_digest=DIGEST
        )

        async with grpc.aio.insecure_channel(stored.value.address) as channel:
            stub = runtime_pb2_grpc.RuntimeServiceStub(channel)
            request = runtime_pb2.GenerateRequest(
                prompt="Once upon a time", sampling=runtime_pb2.SamplingParams(temperature=0, max_tokens=150)
            )
            call = stub.Generate(request, timeout=60)
            responses = [await call.read()]
            stopping = asyncio.create_task(app.stop())
            # The endpoint disappears while the generation is still going...
            deadline = time.monotonic() + 5
            while await state.get(key, runtime_pb2.Endpoint) is not None:
                assert time.monotonic() < deadline, "endpoint still registered during drain"
                await asyncio.sleep(0.02)
            assert not stopping.done()
            # ...and that generation still runs to its end.
            while (response := await call.read()) is not grpc.aio.EOF:
                responses.append(response)
            assert responses[-1].finish_reason == runtime_pb2.FINISH_REASON_LENGTH
            assert responses[-1].usage.completion_tokens == 150
            await asyncio.wait_for(stopping, 15)
    finally:
        await app.stop()
    assert await state.get(key, runtime_pb2.Endpoint) is None
