"""The StorageService gRPC servicer: thin translation between the proto contract and the store and puller."""

from __future__ import annotations

import contextlib
import logging
from typing import AsyncIterator, Callable

import grpc
from google.protobuf import timestamp_pb2

from clowder.storage.v1 import storage_pb2, storage_pb2_grpc

from clowder_storage.puller import Progress, Pulled, Puller
from clowder_storage.store import BlobInfo, BlobStore

log = logging.getLogger(__name__)


def blob_message(info: BlobInfo) -> storage_pb2.Blob:
    created = timestamp_pb2.Timestamp()
    created.FromNanoseconds(int(info.create_time * 1e9))
    return storage_pb2.Blob(digest=info.digest, size_bytes=info.size_bytes, create_time=created)


def progress_message(p: Progress) -> storage_pb2.PullProgress:
    return storage_pb2.PullProgress(
        bytes_done=p.bytes_done, bytes_total=p.bytes_total,
        bytes_per_second=p.bytes_per_second, eta_seconds=p.eta_seconds,
    )


class StorageServicer(storage_pb2_grpc.StorageServiceServicer):
    """Errors are raised as ClowderError; the shared interceptor turns them into statuses with details."""

    def __init__(self, store: BlobStore, puller: Puller, on_change: Callable[[], None] | None = None) -> None:
        self._store = store
        self._puller = puller
        self._on_change = on_change

    async def PullBlob(self, request: storage_pb2.PullBlobRequest,
                       context: grpc.aio.ServicerContext) -> AsyncIterator[storage_pb2.PullBlobResponse]:
        # aclosing: a caller that goes away mid-stream releases its share of the download now, not at GC.
        async with contextlib.aclosing(self._puller.pull(request.source_url, request.expected_digest)) as updates:
            async for update in updates:
                if isinstance(update, Pulled):
                    yield storage_pb2.PullBlobResponse(
                        progress=progress_message(update.progress), blob=blob_message(update.blob)
                    )
                else:
                    yield storage_pb2.PullBlobResponse(progress=progress_message(update))

    async def StatBlob(self, request: storage_pb2.StatBlobRequest,
                       context: grpc.aio.ServicerContext) -> storage_pb2.StatBlobResponse:
        return storage_pb2.StatBlobResponse(blob=blob_message(await self._store.stat(request.digest)))

    async def ListBlobs(self, request: storage_pb2.ListBlobsRequest,
                        context: grpc.aio.ServicerContext) -> storage_pb2.ListBlobsResponse:
        return storage_pb2.ListBlobsResponse(blobs=[blob_message(b) for b in await self._store.list()])

    async def DeleteBlob(self, request: storage_pb2.DeleteBlobRequest,
                         context: grpc.aio.ServicerContext) -> storage_pb2.DeleteBlobResponse:
        await self._store.delete(request.digest)
        log.info("deleted blob %s", request.digest)
        if self._on_change is not None:
            self._on_change()
        return storage_pb2.DeleteBlobResponse()

    async def GetBlobPath(self, request: storage_pb2.GetBlobPathRequest,
                          context: grpc.aio.ServicerContext) -> storage_pb2.GetBlobPathResponse:
        return storage_pb2.GetBlobPathResponse(path=str(await self._store.path(request.digest)))


def registrar(servicer: StorageServicer) -> Callable[[grpc.aio.Server], str]:
    """For create_grpc_server: adds the servicer and names it for health and reflection."""

    def register(server: grpc.aio.Server) -> str:
        storage_pb2_grpc.add_StorageServiceServicer_to_server(servicer, server)
        return storage_pb2.DESCRIPTOR.services_by_name["StorageService"].full_name

    return register
