"""Calls from the controller to a node's StorageService, with the admin token and deadlines."""

from __future__ import annotations

from typing import AsyncIterator

import grpc

from google.protobuf import json_format

from clowder.controller.v1 import resources_pb2
from clowder.storage.v1 import storage_pb2
from clowder_common.auth import bearer_metadata
from clowder_common.clients import StorageStubs
from clowder_common.security import NO_SECURITY, ClusterSecurity
from clowder_common.errors import DataLoss, from_rpc_error

# A pull of tens of gigabytes on a slow link is legitimately long; a hung one is not forever.
PULL_DEADLINE_S = 6 * 3600
CALL_DEADLINE_S = 10
MODEL_MEDIA_TYPE = "application/vnd.clowder.model.layer.v1+gguf"


class StorageClients:
    """One channel per storage address, reused across calls."""

    def __init__(self, admin_token: str | None, security: ClusterSecurity = NO_SECURITY) -> None:
        self._metadata = bearer_metadata(admin_token)
        self._stub = StorageStubs(security)

    async def pull(self, address: str, source_url: str, expected_digest: str = "") -> AsyncIterator[
            storage_pb2.PullBlobResponse]:
        """Relays the node's pull progress; storage errors come back as ClowderError."""
        call = self._stub(address).PullBlob(
            storage_pb2.PullBlobRequest(source_url=source_url, expected_digest=expected_digest),
            metadata=self._metadata,
            timeout=PULL_DEADLINE_S,
        )
        try:
            async for message in call:
                yield message
        except grpc.aio.AioRpcError as err:
            raise from_rpc_error(err) from None
        finally:
            call.cancel()

    async def pull_image(self, address: str, image: resources_pb2.Image) -> AsyncIterator[
            storage_pb2.PullBlobResponse]:
        """Store the aimage on the node as an OCI manifest over its layers (so GC sees it referenced).

        Yields the model layer's progress, then a last message whose `blob` is the stored model layer, the
        same shape as `pull` so callers need not care which one ran.
        """
        request = storage_pb2.PullImageRequest(
            name=image.alias, configuration_json=json_format.MessageToJson(image.configuration, indent=None))
        credentials = storage_pb2.Credentials(secret_ref=image.credentials_ref,
                                              username=image.credentials_username)
        if image.source_url.startswith("oci://"):
            request.source_url = image.source_url
            request.credentials.CopyFrom(credentials)
        else:
            request.layers.append(storage_pb2.LayerSource(
                kind=storage_pb2.LAYER_KIND_MODEL, source_url=image.source_url, expected_digest=image.digest,
                credentials=credentials))
        call = self._stub(address).PullImage(request, metadata=self._metadata, timeout=PULL_DEADLINE_S)
        try:
            async for message in call:
                if message.HasField("image"):
                    model = next((layer for layer in message.image.layers if layer.media_type == MODEL_MEDIA_TYPE),
                                 None)
                    if model is None:
                        raise DataLoss(f"aimage {image.alias} has no model layer")
                    yield storage_pb2.PullBlobResponse(
                        progress=storage_pb2.PullProgress(bytes_done=message.image.size_bytes,
                                                          bytes_total=message.image.size_bytes),
                        blob=storage_pb2.Blob(digest=model.digest, size_bytes=model.size_bytes))
                elif message.layer.index == 0:
                    yield storage_pb2.PullBlobResponse(progress=message.layer.progress)
        except grpc.aio.AioRpcError as err:
            raise from_rpc_error(err) from None
        finally:
            call.cancel()

    async def pin(self, address: str, holder: str, image: str) -> None:
        """Keep the aimage's blobs from GC and eviction while `holder` (a replica) uses them."""
        try:
            await self._stub(address).PinBlobs(storage_pb2.PinBlobsRequest(holder=holder, image=image),
                                               metadata=self._metadata, timeout=CALL_DEADLINE_S)
        except grpc.aio.AioRpcError as err:
            raise from_rpc_error(err) from None

    async def unpin(self, address: str, holder: str) -> None:
        try:
            await self._stub(address).UnpinBlobs(storage_pb2.UnpinBlobsRequest(holder=holder),
                                                 metadata=self._metadata, timeout=CALL_DEADLINE_S)
        except grpc.aio.AioRpcError as err:
            raise from_rpc_error(err) from None

    async def stat(self, address: str, digest: str) -> storage_pb2.Blob | None:
        try:
            reply = await self._stub(address).StatBlob(
                storage_pb2.StatBlobRequest(digest=digest), metadata=self._metadata, timeout=CALL_DEADLINE_S
            )
        except grpc.aio.AioRpcError as err:
            if err.code() == grpc.StatusCode.NOT_FOUND:
                return None
            raise from_rpc_error(err) from None
        return reply.blob

    async def close(self) -> None:
        await self._stub.close()
