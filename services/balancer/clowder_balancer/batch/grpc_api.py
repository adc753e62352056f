"""BatchService on the balancer's gRPC port: the same operations as /v1/files and /v1/batches."""

from __future__ import annotations

import grpc

from clowder.balancer.v1 import batch_pb2, batch_pb2_grpc

from clowder_balancer.apikeys import ApiKeyStore, Principal, bearer
from clowder_balancer.batch.service import BatchApi

SERVICE_NAME = batch_pb2.DESCRIPTOR.services_by_name["BatchService"].full_name
DEFAULT_FILES_LIMIT, DEFAULT_BATCHES_LIMIT = 10_000, 20


class BatchServicer(batch_pb2_grpc.BatchServiceServicer):
    def __init__(self, api: BatchApi, keys: ApiKeyStore, require_keys: bool) -> None:
        self._api = api
        self._keys = keys
        self._require_keys = require_keys

    def register(self, server: grpc.aio.Server) -> str:
        batch_pb2_grpc.add_BatchServiceServicer_to_server(self, server)
        return SERVICE_NAME

    def _principal(self, context: grpc.aio.ServicerContext) -> Principal:
        value = next((v for k, v in context.invocation_metadata() or () if k == "authorization"), "")
        token = bearer(value if isinstance(value, str) else value.decode(errors="replace"))
        return self._keys.authenticate(token, self._require_keys)

    async def CreateFile(self, request, context) -> batch_pb2.CreateFileResponse:
        f = await self._api.create_file(self._principal(context), request.filename, request.purpose, request.content)
        return batch_pb2.CreateFileResponse(file=f)

    async def GetFile(self, request, context) -> batch_pb2.GetFileResponse:
        return batch_pb2.GetFileResponse(file=await self._api.get_file(self._principal(context), request.id))

    async def ListFiles(self, request, context) -> batch_pb2.ListFilesResponse:
        files, more = await self._api.list_files(self._principal(context), request.after,
                                                 request.limit or DEFAULT_FILES_LIMIT, request.purpose)
        return batch_pb2.ListFilesResponse(files=files, has_more=more)

    async def GetFileContent(self, request, context) -> batch_pb2.GetFileContentResponse:
        content = await self._api.file_content(self._principal(context), request.id)
        return batch_pb2.GetFileContentResponse(content=content)

    async def DeleteFile(self, request, context) -> batch_pb2.DeleteFileResponse:
        await self._api.delete_file(self._principal(context), request.id)
        return batch_pb2.DeleteFileResponse()

    async def CreateBatch(self, request, context) -> batch_pb2.CreateBatchResponse:
        batch = await self._api.create_batch(self._principal(context), request.input_file_id, request.endpoint,
                                             request.completion_window or "24h", dict(request.metadata))
        return batch_pb2.CreateBatchResponse(batch=batch)

    async def GetBatch(self, request, context) -> batch_pb2.GetBatchResponse:
        return batch_pb2.GetBatchResponse(batch=await self._api.get_batch(self._principal(context), request.id))

    async def ListBatches(self, request, context) -> batch_pb2.ListBatchesResponse:
        batches, more = await self._api.list_batches(self._principal(context), request.after,
                                                     request.limit or DEFAULT_BATCHES_LIMIT)
        return batch_pb2.ListBatchesResponse(batches=batches, has_more=more)

    async def CancelBatch(self, request, context) -> batch_pb2.CancelBatchResponse:
        return batch_pb2.CancelBatchResponse(batch=await self._api.cancel_batch(self._principal(context), request.id))
