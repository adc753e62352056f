"""StorageService in-process on loopback: real gRPC calls with the token, real etcd, real HTTP sources."""

from __future__ import annotations

import asyncio
import collections
import hashlib
import os
import pathlib
import time

import grpc
import pytest
from aiohttp import web
from grpc_health.v1 import health_pb2, health_pb2_grpc

from clowder.controller.v1 import resources_pb2
from clowder.storage.v1 import storage_pb2, storage_pb2_grpc
from clowder_common import keys
from clowder_common.auth import bearer_metadata
from clowder_common.clients import aio_channel
from clowder_common.errors import from_rpc_error
from clowder_common.processes import free_port
from clowder_storage.app import StorageApp

from helpers.wait import wait_for
from helpers.storage import (CALL_TIMEOUT, TOKEN, digest_of, pull, rpc_error, running_storage, serve_loopback,
                             tmp_files)

# The labels the node registers with (checked in its Node record).
LABELS = {"zone": "test"}
AUTH = bearer_metadata(TOKEN)

class Source:
    """A real HTTP server on 127.0.0.1 serving blobs, counting requests, able to hold a transfer mid-way."""

    def __init__(self) -> None:
        self.blobs: dict[str, bytes] = {}
        self.hits: collections.Counter[str] = collections.Counter()
        # Transfers of /held/<name> stop after `held_prefix` bytes until the gate opens.
        self.gate = asyncio.Event()
        self.held_prefix = 1 << 20
        self.aborted = 0
        self.port = 0
        self._runner: web.AppRunner | None = None

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}/{path}"

    async def _blob(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        self.hits[name] += 1
        if name not in self.blobs:
            raise web.HTTPNotFound()
        return web.Response(body=self.blobs[name])

    async def _held(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        self.hits[name] += 1
        data = self.blobs[name]
        response = web.StreamResponse(headers={"Content-Length": str(len(data))})
        await response.prepare(request)
        await response.write(data[: self.held_prefix])
        await asyncio.wait_for(self.gate.wait(), 30)
        try:
            await response.write(data[self.held_prefix:])
            await response.write_eof()
        except ConnectionResetError:
            # The puller hung up (its pull was cancelled).
            self.aborted += 1
        return response

    async def _compressible(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        self.hits[name] += 1
        response = web.Response(body=self.blobs[name])
        # Compresses only when the client offers an encoding it accepts.
        response.enable_compression()
        return response

    async def _status(self, request: web.Request) -> web.Response:
        return web.Response(status=int(request.match_info["code"]), text="no")

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/blob/{name}", self._blob)
        app.router.add_get("/held/{name}", self._held)
        app.router.add_get("/gz/{name}", self._compressible)
        app.router.add_get("/status/{code}", self._status)
        self._runner, self.port = await serve_loopback(app)

    async def stop(self) -> None:
        self.gate.set()
        if self._runner is not None:
            await self._runner.cleanup()


@pytest.fixture
async def source():
    src = Source()
    await src.start()
    yield src
    await src.stop()


@pytest.fixture
async def storage(tmp_path, etcd, etcd_prefix, state):
    async with running_storage(tmp_path, etcd, etcd_prefix, labels=LABELS) as running:
        yield running


@pytest.fixture
def app(storage) -> StorageApp:
    return storage[0]


@pytest.fixture
def stub(storage) -> storage_pb2_grpc.StorageServiceStub:
    return storage[1]


def write_file(path: pathlib.Path, size: int) -> bytes:
    data = os.urandom(size)
    path.write_bytes(data)
    return data


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            h.update(block)
    return "sha256:" + h.hexdigest()


# -- pulling ----------------------------------------------------------------------


@pytest.mark.inprocess
async def test_pull_from_file_stores_a_verified_blob(app, stub, tmp_path):
    data = write_file(tmp_path / "layer.bin", 3_000_000)
    messages = await pull(stub, (tmp_path / "layer.bin").as_uri())
    final = messages[-1]
    assert final.HasField("blob") and not any(m.HasField("blob") for m in messages[:-1])
    assert final.blob.digest == digest_of(data)
    assert final.blob.size_bytes == len(data)
    assert final.progress.bytes_done == final.progress.bytes_total == len(data)
    assert abs(final.blob.create_time.seconds - time.time()) < 60

    stat = await stub.StatBlob(storage_pb2.StatBlobRequest(digest=final.blob.digest), metadata=AUTH, timeout=5)
    assert stat.blob == final.blob
    listed = await stub.ListBlobs(storage_pb2.ListBlobsRequest(), metadata=AUTH, timeout=5)
    assert [b.digest for b in listed.blobs] == [final.blob.digest]
    assert tmp_files(app) == []


@pytest.mark.inprocess
async def test_get_blob_path_points_at_the_content(stub, tmp_path):
    data = write_file(tmp_path / "layer.bin", 200_000)
    digest = (await pull(stub, (tmp_path / "layer.bin").as_uri()))[-1].blob.digest
    reply = await stub.GetBlobPath(storage_pb2.GetBlobPathRequest(digest=digest), metadata=AUTH, timeout=5)
    assert os.path.isabs(reply.path) and reply.path.endswith(digest.split(":")[1])
    assert await asyncio.to_thread(sha256_file, reply.path) == digest == digest_of(data)


@pytest.mark.inprocess
async def test_pull_bundled_model_streams_progress(tmp_path, etcd, etcd_prefix, state, model_path):
    size = model_path.stat().st_size
    async with running_storage(tmp_path, etcd, etcd_prefix, progress_interval_s=0.05) as (app, stub):
        call = stub.PullBlob(storage_pb2.PullBlobRequest(source_url=model_path.as_uri()),
                             metadata=AUTH, timeout=60)
        arrivals = []
        async for message in call:
            arrivals.append((time.monotonic(), message))
    progress = [m.progress for _, m in arrivals[:-1]]
    assert progress, "a 98 MB pull sent no progress before finishing"
    done = [p.bytes_done for p in progress]
    assert done == sorted(done) and all(0 < d <= size for d in done)
    assert all(p.bytes_total == size for p in progress)
    assert any(p.bytes_per_second > 0 and p.eta_seconds > 0 for p in progress)
    # Progress is rate-limited: never two updates closer than the interval (with scheduling slack).
    gaps = [b[0] - a[0] for a, b in zip(arrivals, arrivals[1:-1])]
    assert all(gap > 0.03 for gap in gaps)
    final = arrivals[-1][1]
    assert final.blob.size_bytes == size
    assert final.blob.digest == await asyncio.to_thread(sha256_file, str(model_path))


@pytest.mark.inprocess
async def test_pull_from_http_twice_stores_once(app, stub, source):
    source.blobs["m"] = os.urandom(2_500_000)
    first = (await pull(stub, source.url("blob/m")))[-1].blob
    second = (await pull(stub, source.url("blob/m")))[-1].blob
    assert first.digest == second.digest == digest_of(source.blobs["m"])
    assert second.create_time == first.create_time
    assert source.hits["m"] == 2
    assert [p.name for p in app.store.blob_dir.iterdir()] == [first.digest.split(":")[1]]
    assert tmp_files(app) == []


@pytest.mark.inprocess
async def test_http_pull_stores_the_published_bytes_not_an_encoding(stub, source):
    source.blobs["m"] = b"very compressible " * 50_000
    final = (await pull(stub, source.url("gz/m")))[-1]
    assert final.blob.digest == digest_of(source.blobs["m"])
    assert final.blob.size_bytes == len(source.blobs["m"])


@pytest.mark.inprocess
async def test_expected_digest_already_stored_skips_the_source(stub, source):
    source.blobs["m"] = os.urandom(100_000)
    digest = (await pull(stub, source.url("blob/m")))[-1].blob.digest
    assert source.hits["m"] == 1
    messages = await pull(stub, source.url("blob/m"), expected=digest)
    assert messages[-1].blob.digest == digest
    assert messages[-1].progress.bytes_done == len(source.blobs["m"])
    assert source.hits["m"] == 1
    # Not even a source that no longer exists is consulted.
    messages = await pull(stub, source.url("blob/gone"), expected=digest)
    assert messages[-1].blob.digest == digest and source.hits["gone"] == 0


@pytest.mark.inprocess
async def test_http_404_is_not_found_without_secrets_in_message(stub, source):
    url = f"http://alice:hunter2@127.0.0.1:{source.port}/blob/missing?token=s3cr3t"
    err = await rpc_error(pull(stub, url))
    assert err.code() == grpc.StatusCode.NOT_FOUND
    decoded = from_rpc_error(err)
    assert decoded.reason == "SOURCE_NOT_FOUND"
    assert decoded.metadata["http_status"] == "404"
    assert f"127.0.0.1:{source.port}/blob/missing" in decoded.message
    assert "hunter2" not in decoded.message and "s3cr3t" not in decoded.message


@pytest.mark.inprocess
@pytest.mark.parametrize(
    "status, code",
    [(401, grpc.StatusCode.PERMISSION_DENIED), (403, grpc.StatusCode.PERMISSION_DENIED),
     (500, grpc.StatusCode.UNAVAILABLE), (503, grpc.StatusCode.UNAVAILABLE)],
)
async def test_http_error_statuses_map_to_codes(stub, source, status, code):
    err = await rpc_error(pull(stub, source.url(f"status/{status}")))
    assert err.code() == code
    assert from_rpc_error(err).metadata["http_status"] == str(status)


@pytest.mark.inprocess
async def test_refused_connection_is_unavailable_and_names_the_url(app, stub):
    port = free_port()
    err = await rpc_error(pull(stub, f"http://127.0.0.1:{port}/m.gguf?sig=abc"))
    assert err.code() == grpc.StatusCode.UNAVAILABLE
    assert f"http://127.0.0.1:{port}/m.gguf" in err.details() and "abc" not in err.details()
    assert tmp_files(app) == []


@pytest.mark.inprocess
async def test_missing_file_source_is_not_found(stub, tmp_path):
    err = await rpc_error(pull(stub, (tmp_path / "nope.gguf").as_uri()))
    assert err.code() == grpc.StatusCode.NOT_FOUND


@pytest.mark.inprocess
async def test_digest_mismatch_is_data_loss_and_leaves_nothing(app, stub, source):
    source.blobs["m"] = os.urandom(1_500_000)
    wrong = digest_of(b"a different model")
    err = await rpc_error(pull(stub, source.url("blob/m"), expected=wrong))
    assert err.code() == grpc.StatusCode.DATA_LOSS
    decoded = from_rpc_error(err)
    assert decoded.metadata["expected_digest"] == wrong
    assert decoded.metadata["actual_digest"] == digest_of(source.blobs["m"])
    listed = await stub.ListBlobs(storage_pb2.ListBlobsRequest(), metadata=AUTH, timeout=5)
    assert list(listed.blobs) == []
    assert list(app.store.blob_dir.iterdir()) == [] and tmp_files(app) == []


@pytest.mark.inprocess
async def test_not_enough_space_is_resource_exhausted(tmp_path, etcd, etcd_prefix, state):
    data = write_file(tmp_path / "layer.bin", 10_000)
    async with running_storage(tmp_path, etcd, etcd_prefix, reserve_free_bytes=1 << 60) as (app, stub):
        err = await rpc_error(pull(stub, (tmp_path / "layer.bin").as_uri()))
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert from_rpc_error(err).metadata["needed_bytes"] == str(len(data))
        assert tmp_files(app) == [] and list(app.store.blob_dir.iterdir()) == []


@pytest.mark.inprocess
@pytest.mark.parametrize(
    "url", ["ftp://example.com/m.gguf", "file://relative/m.gguf", "not a url", "", "http:///m.gguf"]
)
async def test_bad_source_url_is_invalid_argument(stub, url):
    err = await rpc_error(pull(stub, url))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert [v.field for v in from_rpc_error(err).violations] == ["source_url"]


@pytest.mark.inprocess
async def test_bad_expected_digest_is_invalid_argument(stub, tmp_path):
    write_file(tmp_path / "layer.bin", 10)
    err = await rpc_error(pull(stub, (tmp_path / "layer.bin").as_uri(), expected="sha256:../../etc"))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert [v.field for v in from_rpc_error(err).violations] == ["expected_digest"]


# -- concurrency and cancellation -------------------------------------------------


async def first_progress(call) -> storage_pb2.PullBlobResponse:
    """Read until a progress message with bytes in it arrives."""
    while True:
        message = await asyncio.wait_for(call.read(), 10)
        assert message is not grpc.aio.EOF and not message.HasField("blob")
        if message.progress.bytes_done > 0:
            return message


async def read_rest(call) -> list[storage_pb2.PullBlobResponse]:
    messages = []
    while (message := await asyncio.wait_for(call.read(), CALL_TIMEOUT)) is not grpc.aio.EOF:
        messages.append(message)
    return messages


@pytest.mark.inprocess
async def test_concurrent_pulls_share_one_download(app, stub, source):
    data = source.blobs["m"] = os.urandom(3_000_000)
    request = storage_pb2.PullBlobRequest(source_url=source.url("held/m"))
    calls = [stub.PullBlob(request, metadata=AUTH, timeout=CALL_TIMEOUT) for _ in range(2)]
    # Both streams see the same transfer progressing while the source holds it mid-way.
    for call in calls:
        message = await first_progress(call)
        assert message.progress.bytes_total == len(data)
    source.gate.set()
    finals = [(await read_rest(call))[-1] for call in calls]
    assert [f.blob.digest for f in finals] == [digest_of(data)] * 2
    assert source.hits["m"] == 1


@pytest.mark.inprocess
async def test_cancelled_pull_removes_its_partial_file(app, stub, source):
    source.blobs["m"] = os.urandom(3_000_000)
    call = stub.PullBlob(storage_pb2.PullBlobRequest(source_url=source.url("held/m")),
                         metadata=AUTH, timeout=CALL_TIMEOUT)
    await first_progress(call)
    assert len(tmp_files(app)) == 1
    call.cancel()
    await wait_for(lambda: tmp_files(app) == [] and app.puller.active == 0)
    assert list(app.store.blob_dir.iterdir()) == []
    # The transfer itself stopped: the source finds the connection closed when it resumes.
    source.gate.set()
    await wait_for(lambda: source.aborted == 1)


@pytest.mark.inprocess
async def test_shared_download_survives_one_caller_leaving(app, stub, source):
    data = source.blobs["m"] = os.urandom(3_000_000)
    request = storage_pb2.PullBlobRequest(source_url=source.url("held/m"))
    leaver = stub.PullBlob(request, metadata=AUTH, timeout=CALL_TIMEOUT)
    stayer = stub.PullBlob(request, metadata=AUTH, timeout=CALL_TIMEOUT)
    await first_progress(leaver)
    await first_progress(stayer)
    leaver.cancel()
    await asyncio.sleep(0.3)
    assert len(tmp_files(app)) == 1, "the partial file must stay while another caller waits"
    source.gate.set()
    final = (await read_rest(stayer))[-1]
    assert final.blob.digest == digest_of(data)
    assert source.hits["m"] == 1 and tmp_files(app) == []


@pytest.mark.inprocess
async def test_parallel_downloads_are_limited(tmp_path, etcd, etcd_prefix, state, source):
    source.blobs["a"] = os.urandom(2_000_000)
    source.blobs["b"] = os.urandom(2_000_000)
    async with running_storage(tmp_path, etcd, etcd_prefix, max_parallel_pulls=1) as (app, stub):
        first = stub.PullBlob(storage_pb2.PullBlobRequest(source_url=source.url("held/a")),
                              metadata=AUTH, timeout=CALL_TIMEOUT)
        await first_progress(first)
        second = stub.PullBlob(storage_pb2.PullBlobRequest(source_url=source.url("held/b")),
                               metadata=AUTH, timeout=CALL_TIMEOUT)
        queued = await asyncio.wait_for(second.read(), 5)
        # The second pull waits for a slot: it reports nothing done and has not contacted its source.
        assert queued.progress.bytes_done == 0 and source.hits["b"] == 0
        source.gate.set()
        finals = [(await read_rest(call))[-1] for call in (first, second)]
        assert [f.blob.digest for f in finals] == [digest_of(source.blobs["a"]), digest_of(source.blobs["b"])]
        assert source.hits["b"] == 1


@pytest.mark.inprocess
async def test_stalled_source_times_out_as_unavailable(tmp_path, etcd, etcd_prefix, state, source):
    source.blobs["m"] = os.urandom(2_000_000)
    async with running_storage(tmp_path, etcd, etcd_prefix, http_read_timeout_s=0.3,
                               pull_retries=0) as (app, stub):
        started = time.monotonic()
        err = await rpc_error(pull(stub, source.url("held/m")))
        assert err.code() == grpc.StatusCode.UNAVAILABLE
        assert from_rpc_error(err).reason == "SOURCE_TIMEOUT"
        assert time.monotonic() - started < 5
        assert tmp_files(app) == [] and list(app.store.blob_dir.iterdir()) == []


# -- the other RPCs ----------------------------------------------------------------


@pytest.mark.inprocess
async def test_delete_blob(stub, tmp_path):
    write_file(tmp_path / "layer.bin", 1000)
    digest = (await pull(stub, (tmp_path / "layer.bin").as_uri()))[-1].blob.digest
    await stub.DeleteBlob(storage_pb2.DeleteBlobRequest(digest=digest), metadata=AUTH, timeout=5)
    err = await rpc_error(stub.StatBlob(storage_pb2.StatBlobRequest(digest=digest), metadata=AUTH, timeout=5))
    assert err.code() == grpc.StatusCode.NOT_FOUND
    listed = await stub.ListBlobs(storage_pb2.ListBlobsRequest(), metadata=AUTH, timeout=5)
    assert list(listed.blobs) == []


@pytest.mark.inprocess
@pytest.mark.parametrize("method, request_cls", [
    ("StatBlob", storage_pb2.StatBlobRequest),
    ("DeleteBlob", storage_pb2.DeleteBlobRequest),
    ("GetBlobPath", storage_pb2.GetBlobPathRequest),
])
async def test_absent_and_malformed_digests(stub, method, request_cls):
    rpc = getattr(stub, method)
    absent = digest_of(b"never stored")
    err = await rpc_error(rpc(request_cls(digest=absent), metadata=AUTH, timeout=5))
    assert err.code() == grpc.StatusCode.NOT_FOUND
    assert from_rpc_error(err).metadata["digest"] == absent
    err = await rpc_error(rpc(request_cls(digest="sha256:../../etc"), metadata=AUTH, timeout=5))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    violations = from_rpc_error(err).violations
    assert [v.field for v in violations] == ["digest"] and "sha256:" in violations[0].description


@pytest.mark.inprocess
async def test_calls_need_the_admin_token(app, stub):
    request = storage_pb2.ListBlobsRequest()
    err = await rpc_error(stub.ListBlobs(request, timeout=5))
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED
    err = await rpc_error(stub.ListBlobs(request, metadata=bearer_metadata("wrong"), timeout=5))
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED
    assert from_rpc_error(err).reason == "INVALID_TOKEN"
    stream = stub.PullBlob(storage_pb2.PullBlobRequest(source_url="file:///etc/hostname"), timeout=5)
    err = await rpc_error(stream.read())
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED
    assert list(app.store.blob_dir.iterdir()) == []
    # Probes work without a token.
    async with aio_channel(f"127.0.0.1:{app.port}") as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


# -- node registration ---------------------------------------------------------------


@pytest.mark.unit
def test_gpus_counted_from_device_nodes(tmp_path):
    from clowder_storage.registration import count_gpus

    for name in ("nvidia0", "nvidia1", "nvidiactl", "nvidia-uvm", "null"):
        (tmp_path / name).touch()
    assert count_gpus(tmp_path) == 2
    assert count_gpus(tmp_path / "missing") == 0


@pytest.mark.inprocess
async def test_node_registered_with_its_address_until_stopped(tmp_path, etcd, etcd_prefix, state):
    key = state.key(keys.node("node-a"))
    async with running_storage(tmp_path, etcd, etcd_prefix, labels=LABELS) as (app, stub):
        got = await state.get(key, resources_pb2.Node)
        assert got is not None
        node = got.value
        assert node.name == "node-a"
        assert node.storage_address == f"127.0.0.1:{app.port}"
        assert dict(node.labels) == LABELS
        assert node.cpus == os.cpu_count()
        assert node.memory_bytes == os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        assert 0 < node.store_free_bytes <= (await asyncio.to_thread(os.statvfs, app.config.data_dir)).f_blocks * \
            os.statvfs(app.config.data_dir).f_frsize
        assert abs(node.start_time.seconds - time.time()) < 60
        # The record is rewritten when the store changes, so free space stays current.
        write_file(tmp_path / "layer.bin", 50_000)
        await pull(stub, (tmp_path / "layer.bin").as_uri())
        deadline = time.monotonic() + 5
        while (await state.get(key, resources_pb2.Node)).mod_revision == got.mod_revision:
            assert time.monotonic() < deadline, "node record not refreshed after a pull"
            await asyncio.sleep(0.05)
        # ...and lists what the store holds, for the scheduler's locality score.
        refreshed = (await state.get(key, resources_pb2.Node)).value
        assert list(refreshed.blob_digests) == ["sha256:" + hashlib.sha256((tmp_path / "layer.bin").read_bytes())
                                                .hexdigest()]
    # stop() revoked the lease: the node is gone at once, not after the TTL.
    assert await state.get(key, resources_pb2.Node) is None
