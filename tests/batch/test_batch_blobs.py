"""Batch file contents in a real storage node: PutBlob stores and pins them, GC keeps them until unpinned."""

from __future__ import annotations

import grpc
import pytest

from clowder.storage.v1 import storage_pb2
from clowder_balancer.batch.blobs import BlobClient, holder_of

from helpers.storage import TOKEN, digest_of, md, rpc_error, running_storage

pytestmark = pytest.mark.inprocess


async def test_a_file_is_stored_pinned_read_back_and_collected_only_once_unpinned(tmp_path, etcd, state, etcd_prefix):
    content = b'{"custom_id": "a"}\n' * 100_000  # several PutBlob messages
    # No GC grace: only the pins keep the content.
    async with running_storage(tmp_path, etcd, etcd_prefix, gc_grace_s=0.0) as (app, stub):
        blobs = BlobClient(state, TOKEN)
        try:
            digest, node = await blobs.put(content, holder_of("file-1"))
            assert (digest, node) == (digest_of(content), "node-a")
            assert await blobs.read(node, digest) == content
            collected = await stub.CollectGarbage(storage_pb2.CollectGarbageRequest(), metadata=md(), timeout=30)
            assert digest not in collected.removed_digests
            # The same content again (another file): stored once, pinned by both.
            assert (await blobs.put(content, holder_of("file-2")))[0] == digest
            await blobs.unpin(node, holder_of("file-1"))
            collected = await stub.CollectGarbage(storage_pb2.CollectGarbageRequest(), metadata=md(), timeout=30)
            assert digest not in collected.removed_digests
            await blobs.unpin(node, holder_of("file-2"))
            collected = await stub.CollectGarbage(storage_pb2.CollectGarbageRequest(), metadata=md(), timeout=30)
            assert digest in collected.removed_digests
        finally:
            await blobs.close()


async def test_put_blob_refuses_content_that_does_not_match_or_is_too_long(tmp_path, etcd, etcd_prefix):
    async with running_storage(tmp_path, etcd, etcd_prefix) as (app, stub):
        async def one(**first):
            yield storage_pb2.PutBlobRequest(data=b"hello", **first)

        wrong = await rpc_error(stub.PutBlob(one(expected_digest=digest_of(b"other")), metadata=md(), timeout=10))
        assert wrong.code() == grpc.StatusCode.DATA_LOSS
        long = await rpc_error(stub.PutBlob(one(max_bytes=4), metadata=md(), timeout=10))
        assert long.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        anonymous = await rpc_error(stub.PutBlob(one(), timeout=10))
        assert anonymous.code() == grpc.StatusCode.UNAUTHENTICATED
        stored = await stub.PutBlob(one(), metadata=md(), timeout=10)
        assert stored.blob.digest == digest_of(b"hello") and stored.blob.size_bytes == 5
        assert not [p for p in app.store.tmp_dir.iterdir() if p.name.startswith("pull-")]
