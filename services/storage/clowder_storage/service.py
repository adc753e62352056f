"""The StorageService gRPC servicer: thin translation between the proto contract and the store and puller."""

from __future__ import annotations

import contextlib
import logging
import os
from typing import AsyncGenerator, AsyncIterator, Callable

import grpc
from google.protobuf import timestamp_pb2

from clowder.storage.v1 import storage_pb2, storage_pb2_grpc

from clowder_common.errors import InvalidArgument, NotFound

from clowder_storage.image_pulls import ImagePuller
from clowder_storage.images import MEDIA_ADAPTER, MEDIA_MODEL, TITLE, ImageIndex, ImageView, LayerSpec, LayerUpdate
from clowder_storage.oci import OciClient
from clowder_storage.puller import Progress, Pulled, Puller
from clowder_storage.sources import NO_CREDENTIAL, Credential, resolve_secret_ref
from clowder_storage.space import Space, validate_holder
from clowder_storage.store import BlobInfo, BlobStore, parse_digest

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


LAYER_MEDIA = {storage_pb2.LAYER_KIND_MODEL: MEDIA_MODEL, storage_pb2.LAYER_KIND_ADAPTER: MEDIA_ADAPTER}
READ_CHUNK_BYTES = 1 << 20


def credential_from(message: storage_pb2.Credentials, field: str = "credentials") -> Credential:
    """Secrets for one call; a secret_ref is read on this node so the secret itself never travels or persists."""
    bearer, username, password = message.bearer_token, message.username, message.password
    if message.secret_ref:
        secret = resolve_secret_ref(message.secret_ref, field=f"{field}.secret_ref")
        if username:
            password = secret
        else:
            bearer = secret
    if bearer and username:
        raise InvalidArgument("credentials take a bearer token or a username, not both", field=field)
    if not bearer and not username:
        return NO_CREDENTIAL
    return Credential(bearer, username, password)


def image_message(view: ImageView) -> storage_pb2.StoredImage:
    layers = [
        storage_pb2.StoredLayer(media_type=d.media_type, digest=d.digest, size_bytes=d.size,
                                path=view.paths.get(d.digest, ""), title=d.annotations.get(TITLE, ""))
        for d in view.manifest.layers
    ]
    config = view.manifest.config
    return storage_pb2.StoredImage(
        name=view.name, manifest_digest=view.manifest_digest, manifest_size_bytes=view.manifest_size,
        config_digest=config.digest, configuration_json=view.configuration_json, layers=layers,
        size_bytes=config.size + sum(d.size for d in view.manifest.layers), complete=view.complete,
    )


class StorageServicer(storage_pb2_grpc.StorageServiceServicer):
    """Errors are raised as ClowderError; the shared interceptor turns them into statuses with details."""

    def __init__(self, store: BlobStore, puller: Puller, index: ImageIndex, images: ImagePuller, space: Space,
                 oci: OciClient, on_change: Callable[[], None], growing_wait_s: float = 10.0) -> None:
        self._store = store
        self._puller = puller
        self._index = index
        self._images = images
        self._space = space
        self._oci = oci
        # The store's content changed outside a pull (delete, put, GC): the node record says so soon.
        self._changed = on_change
        # ReadBlob of a blob still being pulled here waits this long for its first bytes (0: NOT_FOUND at once).
        self._growing_wait_s = growing_wait_s

    async def PullBlob(self, request: storage_pb2.PullBlobRequest,
                       context: grpc.aio.ServicerContext) -> AsyncIterator[storage_pb2.PullBlobResponse]:
        # aclosing: a caller that goes away mid-stream releases its share of the download now, not at GC.
        async with contextlib.aclosing(self._puller.pull(
                request.source_url, request.expected_digest, credential_from(request.credentials))) as updates:
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
        self._changed()
        return storage_pb2.DeleteBlobResponse()

    async def GetBlobPath(self, request: storage_pb2.GetBlobPathRequest,
                          context: grpc.aio.ServicerContext) -> storage_pb2.GetBlobPathResponse:
        path = await self._store.path(request.digest)
        await self._store.run(self._store.touch_sync, request.digest)
        return storage_pb2.GetBlobPathResponse(path=str(path))

    async def ReadBlob(self, request: storage_pb2.ReadBlobRequest,
                       context: grpc.aio.ServicerContext) -> AsyncIterator[storage_pb2.ReadBlobResponse]:
        try:
            path = await self._store.path(request.digest)
        except NotFound:
            if self._growing_wait_s <= 0:
                raise
            # Not stored yet, but perhaps being pulled here: another node chains from this download.
            try:
                async for data, total in self._puller.read_growing(request.digest, request.offset, request.length,
                                                                   self._growing_wait_s):
                    yield storage_pb2.ReadBlobResponse(data=data, size_bytes=total)
                return
            except NotFound:
                # Finished between the two looks: it is stored now (or gone, and this raises NotFound).
                path = await self._store.path(request.digest)
        fd = await self._store.run(os.open, path, os.O_RDONLY)
        try:
            size = (await self._store.run(os.fstat, fd)).st_size
            offset = min(request.offset, size)
            stop = size if not request.length else min(size, offset + request.length)
            while offset < stop:
                data = await self._store.run(os.pread, fd, min(READ_CHUNK_BYTES, stop - offset), offset)
                if not data:
                    break
                offset += len(data)
                yield storage_pb2.ReadBlobResponse(data=data, size_bytes=size)
        finally:
            await self._store.run(os.close, fd)

    async def PutBlob(self, request_iterator: AsyncIterator[storage_pb2.PutBlobRequest],
                      context: grpc.aio.ServicerContext) -> storage_pb2.PutBlobResponse:
        temp = None
        expected = holder = ""
        try:
            async for message in request_iterator:
                if temp is None:
                    # The first message says what the content must be and who keeps it.
                    if message.expected_digest:
                        parse_digest(message.expected_digest, "expected_digest")
                        expected = message.expected_digest
                    holder = validate_holder(message.holder) if message.holder else ""
                    temp = await self._store.new_temp(message.max_bytes)
                if message.data:
                    await self._store.write(temp, message.data)
            if temp is None:
                temp = await self._store.new_temp()
        except BaseException:
            if temp is not None:
                await self._store.discard(temp)
            raise
        info = await self._store.commit(temp, expected or None)
        if holder:
            await self._space.pin(holder, [info.digest], 0)
        self._changed()
        return storage_pb2.PutBlobResponse(blob=blob_message(info))

    async def PullImage(self, request: storage_pb2.PullImageRequest,
                        context: grpc.aio.ServicerContext) -> AsyncIterator[storage_pb2.PullImageResponse]:
        updates: AsyncGenerator[LayerUpdate | ImageView, None]
        if request.source_url:
            if request.layers:
                raise InvalidArgument("give layers or an oci:// source_url, not both", field="layers")
            updates = self._images.pull_oci(request.name, request.source_url, credential_from(request.credentials))
        else:
            layers = []
            for i, layer in enumerate(request.layers):
                media = LAYER_MEDIA.get(layer.kind)
                if media is None:
                    raise InvalidArgument(f"layers[{i}].kind must be MODEL or ADAPTER", field=f"layers[{i}].kind")
                layers.append(LayerSpec(media, layer.source_url, layer.expected_digest,
                                        credential_from(layer.credentials, field=f"layers[{i}].credentials")))
            updates = self._images.pull(request.name, layers, request.configuration_json)
        async with contextlib.aclosing(updates) as stream:
            async for update in stream:
                if isinstance(update, ImageView):
                    self._changed()
                    yield storage_pb2.PullImageResponse(image=image_message(update))
                else:
                    yield storage_pb2.PullImageResponse(layer=storage_pb2.LayerProgress(
                        index=update.index, digest=update.digest, progress=progress_message(update.progress)))

    async def PushImage(self, request: storage_pb2.PushImageRequest,
                        context: grpc.aio.ServicerContext) -> AsyncIterator[storage_pb2.PushImageResponse]:
        updates = self._oci.push(request.name, request.target_url, credential_from(request.credentials))
        async with contextlib.aclosing(updates) as stream:
            async for update in stream:
                if isinstance(update, str):
                    yield storage_pb2.PushImageResponse(manifest_digest=update)
                else:
                    yield storage_pb2.PushImageResponse(layer=storage_pb2.LayerProgress(
                        index=update.index, digest=update.digest, progress=progress_message(update.progress)))

    async def ResolveImage(self, request: storage_pb2.ResolveImageRequest,
                           context: grpc.aio.ServicerContext) -> storage_pb2.ResolveImageResponse:
        return storage_pb2.ResolveImageResponse(image=image_message(await self._index.resolve(request.name)))

    async def ListImages(self, request: storage_pb2.ListImagesRequest,
                         context: grpc.aio.ServicerContext) -> storage_pb2.ListImagesResponse:
        return storage_pb2.ListImagesResponse(images=[image_message(v) for v in await self._index.list()])

    async def DeleteImage(self, request: storage_pb2.DeleteImageRequest,
                          context: grpc.aio.ServicerContext) -> storage_pb2.DeleteImageResponse:
        await self._index.delete(request.name)
        return storage_pb2.DeleteImageResponse()

    async def PinBlobs(self, request: storage_pb2.PinBlobsRequest,
                       context: grpc.aio.ServicerContext) -> storage_pb2.PinBlobsResponse:
        digests = list(request.digests)
        for i, digest in enumerate(digests):
            parse_digest(digest, field=f"digests[{i}]")
            await self._store.stat(digest)
        if request.image:
            view = await self._index.resolve(request.image)
            digests += [view.manifest_digest, *view.manifest.digests()]
        if not digests:
            raise InvalidArgument("name digests or an image to pin", field="digests")
        pinned = await self._space.pin(request.holder, digests, request.ttl_seconds)
        return storage_pb2.PinBlobsResponse(digests=pinned)

    async def UnpinBlobs(self, request: storage_pb2.UnpinBlobsRequest,
                         context: grpc.aio.ServicerContext) -> storage_pb2.UnpinBlobsResponse:
        await self._space.unpin(request.holder, request.digests)
        return storage_pb2.UnpinBlobsResponse()

    async def CollectGarbage(self, request: storage_pb2.CollectGarbageRequest,
                             context: grpc.aio.ServicerContext) -> storage_pb2.CollectGarbageResponse:
        removed, freed = await self._space.collect(dry_run=request.dry_run)
        if removed and not request.dry_run:
            self._changed()
        return storage_pb2.CollectGarbageResponse(removed_digests=removed, freed_bytes=freed)

    async def VerifyBlobs(self, request: storage_pb2.VerifyBlobsRequest,
                          context: grpc.aio.ServicerContext) -> storage_pb2.VerifyBlobsResponse:
        checked, bad = await self._space.verify(request.digests)
        if bad:
            self._changed()
        return storage_pb2.VerifyBlobsResponse(checked=checked, quarantined_digests=bad)

    async def GetStoreStats(self, request: storage_pb2.GetStoreStatsRequest,
                            context: grpc.aio.ServicerContext) -> storage_pb2.GetStoreStatsResponse:
        usage = await self._space.usage()
        return storage_pb2.GetStoreStatsResponse(
            used_bytes=usage.used_bytes, blob_count=usage.blob_count, quota_bytes=self._space.quota_bytes,
            free_bytes=await self._store.free_bytes(), pinned_bytes=usage.pinned_bytes,
            image_count=len(await self._index.list()),
        )


def registrar(servicer: StorageServicer) -> Callable[[grpc.aio.Server], str]:
    """For create_grpc_server: adds the servicer and names it for health and reflection."""

    def register(server: grpc.aio.Server) -> str:
        storage_pb2_grpc.add_StorageServiceServicer_to_server(servicer, server)
        return storage_pb2.DESCRIPTOR.services_by_name["StorageService"].full_name

    return register
