"""Pulls under faults against a real ranged HTTP server: dropped connections, wrong bytes, quotas, credentials."""

from __future__ import annotations

import asyncio
import base64
import errno
import logging
import os
import time

import grpc
import pytest

from clowder.storage.v1 import storage_pb2
from clowder_common.errors import ResourceExhausted, from_rpc_error
from clowder_storage.store import _write
from helpers.storage import (digest_of, md, pull, rpc_error, running_storage, stored_names,
                             tmp_files)


@pytest.fixture
async def storage(tmp_path, etcd, etcd_prefix, state):
    async with running_storage(tmp_path, etcd, etcd_prefix) as running:
        yield running


@pytest.mark.inprocess
async def test_dropped_connection_resumes_with_a_range_and_verifies(storage, source):
    app, stub = storage
    data = os.urandom(3_000_000)
    source.blobs["m"] = data
    gate = source.abort_gates["m"] = asyncio.Event()
    messages = []
    request = storage_pb2.PullBlobRequest(source_url=source.url("m"), expected_digest=digest_of(data))
    async for message in stub.PullBlob(request, metadata=md(), timeout=30):
        messages.append(message)
        # The connection drops only once the storage has written the first MiB.
        if message.progress.bytes_done >= 1 << 20:
            gate.set()
    assert messages[-1].blob.digest == digest_of(data)
    assert (app.store.blob_dir / digest_of(data)[7:]).read_bytes() == data
    ranges = [r for name, r in source.requests if name == "m"]
    # The second request asks for the rest only: the hash went on over the bytes already written.
    assert ranges == ["", f"bytes={1 << 20}-"]
    assert source.bytes_sent == len(data)
    assert tmp_files(app) == []


@pytest.mark.inprocess
async def test_repeated_drops_still_end_in_a_verified_blob(storage, source):
    app, stub = storage
    data = os.urandom(3_000_000)
    source.blobs["m"] = data
    source.drops["m"] = [1_200_000, 500_000, 10]
    messages = await pull(stub, source.url("m"), expected=digest_of(data))
    assert messages[-1].blob.digest == digest_of(data)
    assert len([r for name, r in source.requests if name == "m"]) == 4
    assert tmp_files(app) == []


@pytest.mark.inprocess
async def test_source_without_ranges_restarts_from_zero_and_verifies(storage, source):
    app, stub = storage
    data = os.urandom(2_000_000)
    source.blobs["m"] = data
    source.ranges = False
    source.drops["m"] = [700_000]
    messages = await pull(stub, source.url("m"))
    assert messages[-1].blob.digest == digest_of(data)
    assert source.bytes_sent == 700_000 + len(data)


@pytest.mark.inprocess
async def test_large_source_in_parallel_ranged_parts_with_a_drop(tmp_path, etcd, etcd_prefix, state, source):
    data = os.urandom(4_200_000)
    source.blobs["big"] = data
    source.drops["big"] = [300_000]
    async with running_storage(tmp_path, etcd, etcd_prefix, parallel_min_bytes=1_000_000, parallel_parts=4,
                               parallel_part_min_bytes=1 << 20, parallel_part_max_bytes=1 << 20) as (app, stub):
        messages = await pull(stub, source.url("big"), expected=digest_of(data))
        assert messages[-1].blob.digest == digest_of(data)
        assert (app.store.blob_dir / digest_of(data)[7:]).read_bytes() == data
        ranges = [r for name, r in source.requests if name == "big"]
        # The first answer carries piece 1; pieces 2..5 (1 MiB each, in file order) as bounded ranges, plus the
        # resumed remainder of the piece that broke off (the first, at 300 kB; what was read before counts).
        pieces = [f"bytes={i << 20}-{min((i + 1) << 20, len(data)) - 1}" for i in range(1, 5)]
        resumed = [r for r in ranges if r and r not in pieces]
        assert ranges[0] == "" and sorted(r for r in ranges if r in pieces) == pieces
        assert len(ranges) == 6 and len(resumed) == 1 and resumed[0].endswith(f"-{(1 << 20) - 1}")
        assert int(resumed[0].removeprefix("bytes=").split("-")[0]) <= 300_000
        assert tmp_files(app) == []


@pytest.mark.inprocess
async def test_parallel_pull_is_one_piece_per_connection_under_the_piece_cap(tmp_path, etcd, etcd_prefix, state,
                                                                              source):
    data = os.urandom(8 << 20)
    source.blobs["big"] = data
    async with running_storage(tmp_path, etcd, etcd_prefix, parallel_min_bytes=1_000_000, parallel_parts=4,
                               parallel_part_min_bytes=1 << 20) as (app, stub):
        messages = await pull(stub, source.url("big"), expected=digest_of(data))
        assert messages[-1].blob.digest == digest_of(data)
    # Four quarters: the first answer carries the first, three bounded ranges the rest.
    ranges = sorted(r for _, r in source.requests)
    assert ranges == [""] + [f"bytes={i << 21}-{((i + 1) << 21) - 1}" for i in (1, 2, 3)]


@pytest.mark.inprocess
async def test_parallel_pieces_reuse_their_connections(tmp_path, etcd, etcd_prefix, state, source):
    data = os.urandom(12 << 20)
    source.blobs["big"] = data
    async with running_storage(tmp_path, etcd, etcd_prefix, parallel_min_bytes=1_000_000, parallel_parts=3,
                               parallel_part_min_bytes=1 << 20, parallel_part_max_bytes=1 << 20) as (app, stub):
        messages = await pull(stub, source.url("big"), expected=digest_of(data))
        assert messages[-1].blob.digest == digest_of(data)
        assert (app.store.blob_dir / digest_of(data)[7:]).read_bytes() == data
    assert len(source.requests) == 12
    # A piece read to its end hands its connection to the next piece (aiohttp releases it at the body's end):
    # 3 workers, plus the first answer's connection, left after its first MiB. One per piece would be 12.
    assert len(set(source.peers)) <= 4


@pytest.mark.inprocess
async def test_wrong_bytes_are_data_loss_and_nothing_is_stored(storage, source):
    app, stub = storage
    data = os.urandom(1_500_000)
    source.blobs["m"] = data
    source.corrupt.add("m")
    err = await rpc_error(pull(stub, source.url("m"), expected=digest_of(data)))
    assert err.code() == grpc.StatusCode.DATA_LOSS
    assert digest_of(data) in err.details()
    assert stored_names(app) == [] and tmp_files(app) == []


@pytest.mark.inprocess
async def test_eight_concurrent_pulls_of_one_blob_make_one_transfer(storage, source):
    app, stub = storage
    data = os.urandom(3_000_000)
    source.blobs["m"] = data
    source.holds["m"] = asyncio.Event()
    calls = [asyncio.ensure_future(pull(stub, source.url("m"), expected=digest_of(data) if i % 2 else ""))
             for i in range(8)]
    deadline = time.monotonic() + 20
    # Released only once all eight are waiting on the one download.
    while not any(len(d.expectations) == 8 for d in app.puller._downloads.values()):
        assert time.monotonic() < deadline, "the eight pulls never joined one download"
        await asyncio.sleep(0.02)
    source.holds["m"].set()
    results = await asyncio.gather(*calls)
    assert {r[-1].blob.digest for r in results} == {digest_of(data)}
    assert len(source.requests) == 1 and source.bytes_sent == len(data)


@pytest.mark.inprocess
async def test_pull_over_the_quota_fails_up_front_and_leaves_the_store_intact(tmp_path, etcd, etcd_prefix, state,
                                                                              source):
    small, big = os.urandom(400_000), os.urandom(2_000_000)
    source.blobs["small"], source.blobs["big"] = small, big
    async with running_storage(tmp_path, etcd, etcd_prefix, max_store_bytes=1_000_000) as (app, stub):
        await pull(stub, source.url("small"))
        # Pinned, so eviction cannot make room by throwing it away.
        await stub.PinBlobs(storage_pb2.PinBlobsRequest(holder="r1", digests=[digest_of(small)]), metadata=md())
        # The source holds its body after the first MiB: only a refusal on the announced size can end the pull.
        source.holds["big"] = asyncio.Event()
        err = await rpc_error(pull(stub, source.url("big")))
        source.holds["big"].set()
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "quota" in err.details()
        assert stored_names(app) == [digest_of(small)[7:]] and tmp_files(app) == []
        verify = await stub.VerifyBlobs(storage_pb2.VerifyBlobsRequest(), metadata=md())
        assert verify.checked == 1 and not verify.quarantined_digests


@pytest.mark.inprocess
async def test_blob_size_limit_is_resource_exhausted(tmp_path, etcd, etcd_prefix, state, source):
    source.blobs["big"] = os.urandom(600_000)
    async with running_storage(tmp_path, etcd, etcd_prefix, max_blob_bytes=500_000) as (app, stub):
        err = await rpc_error(pull(stub, source.url("big")))
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert from_rpc_error(err).metadata["limit_bytes"] == "500000"
        assert stored_names(app) == [] and tmp_files(app) == []


@pytest.mark.unit
def test_a_full_volume_is_resource_exhausted():
    # /dev/full fails every write with ENOSPC, as a full store volume does.
    fd = os.open("/dev/full", os.O_WRONLY)
    try:
        with pytest.raises(ResourceExhausted, match="full"):
            _write(fd, memoryview(b"x" * 4096))
    finally:
        os.close(fd)
    assert errno.ENOSPC  # the mapping above is for this errno


@pytest.mark.inprocess
async def test_bearer_basic_and_secret_ref_credentials_never_logged(storage, source, monkeypatch, caplog):
    app, stub = storage
    data = os.urandom(200_000)
    source.blobs["m"] = data
    source.token = "s3cr3t-token-value"
    caplog.set_level(logging.DEBUG)
    err = await rpc_error(pull(stub, source.url("m")))
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    bad = await rpc_error(pull(stub, source.url("m"), credentials=storage_pb2.Credentials(bearer_token="wrong")))
    assert bad.code() == grpc.StatusCode.PERMISSION_DENIED and "wrong" not in bad.details()
    ok = await pull(stub, source.url("m"), credentials=storage_pb2.Credentials(bearer_token=source.token))
    assert ok[-1].blob.digest == digest_of(data)
    await stub.DeleteBlob(storage_pb2.DeleteBlobRequest(digest=digest_of(data)), metadata=md())
    monkeypatch.setenv("CLOWDER_TEST_HTTP_TOKEN", source.token)
    ref = await pull(stub, source.url("m"), credentials=storage_pb2.Credentials(secret_ref="env:CLOWDER_TEST_HTTP_TOKEN"))
    assert ref[-1].blob.digest == digest_of(data)
    source.token, source.basic = "", base64.b64encode(b"alice:pw-123456").decode()
    await stub.DeleteBlob(storage_pb2.DeleteBlobRequest(digest=digest_of(data)), metadata=md())
    basic = await pull(stub, source.url("m"), credentials=storage_pb2.Credentials(username="alice",
                                                                                 password="pw-123456"))
    assert basic[-1].blob.digest == digest_of(data)
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "s3cr3t-token-value" not in logged and "pw-123456" not in logged


@pytest.mark.inprocess
async def test_missing_secret_ref_is_invalid_argument(storage, source):
    _, stub = storage
    source.blobs["m"] = b"x"
    err = await rpc_error(pull(stub, source.url("m"),
                               credentials=storage_pb2.Credentials(secret_ref="env:CLOWDER_NO_SUCH_VARIABLE")))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert from_rpc_error(err).violations[0].field == "credentials.secret_ref"


@pytest.mark.inprocess
async def test_connection_dropped_after_the_last_byte_still_completes(storage, source):
    app, stub = storage
    data = os.urandom(1_000_000)
    source.blobs["m"] = data
    source.drops["m"] = [len(data)]
    messages = await pull(stub, source.url("m"), expected=digest_of(data))
    assert messages[-1].blob.digest == digest_of(data)
    assert len(source.requests) <= 2 and tmp_files(app) == []
