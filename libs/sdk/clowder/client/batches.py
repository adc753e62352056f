"""Batch jobs in the SDK: files and batches on a balancer's BatchService (`client.batches`), sync and asyncio."""

from __future__ import annotations

import asyncio
import builtins
import json
import pathlib
import time
from typing import Any, Iterator

from clowder.balancer.v1 import batch_pb2, batch_pb2_grpc
from clowder_common.errors import DeadlineExceeded

ENDED = frozenset({batch_pb2.BATCH_STATUS_COMPLETED, batch_pb2.BATCH_STATUS_FAILED, batch_pb2.BATCH_STATUS_EXPIRED,
                   batch_pb2.BATCH_STATUS_CANCELLED})
# Storing a file of up to the balancer's limit (100 MiB by default) takes longer than a usual call.
UPLOAD_TIMEOUT_S = 300.0


def _content(source: bytes | str | pathlib.Path) -> tuple[bytes, str]:
    if isinstance(source, bytes):
        return source, "input.jsonl"
    path = pathlib.Path(source)
    return path.read_bytes(), path.name


def parse_lines(content: bytes) -> list[dict[str, Any]]:
    """The lines of an output or error file as OpenAI shapes them ({id, custom_id, response, error})."""
    return [json.loads(line) for line in content.splitlines() if line.strip()]


class Batches:
    """Uploads, batches and their results, under the client's API key (calls take the caller's settings)."""

    def __init__(self, caller: Any, stub: batch_pb2_grpc.BatchServiceStub) -> None:
        self._call, self._stub = caller, stub

    def upload(self, source: bytes | str | pathlib.Path, filename: str = "") -> batch_pb2.BatchFile:
        """Store a JSONL input file (bytes or a path) for batches; the file object comes back."""
        content, name = _content(source)
        request = batch_pb2.CreateFileRequest(filename=filename or name, purpose="batch", content=content)
        return self._call.unary(self._stub.CreateFile, request, idempotent=False, timeout_s=UPLOAD_TIMEOUT_S).file

    def file(self, file_id: str) -> batch_pb2.BatchFile:
        return self._call.unary(self._stub.GetFile, batch_pb2.GetFileRequest(id=file_id), idempotent=True).file

    def files(self, purpose: str = "", page_size: int = 100) -> Iterator[batch_pb2.BatchFile]:
        after = ""
        while True:
            page = self._call.unary(self._stub.ListFiles, batch_pb2.ListFilesRequest(
                after=after, limit=page_size, purpose=purpose), idempotent=True)
            yield from page.files
            if not page.has_more or not page.files:
                return
            after = page.files[-1].id

    def content(self, file_id: str) -> bytes:
        return self._call.unary(self._stub.GetFileContent, batch_pb2.GetFileContentRequest(id=file_id),
                                idempotent=True, timeout_s=UPLOAD_TIMEOUT_S).content

    def delete_file(self, file_id: str) -> None:
        self._call.unary(self._stub.DeleteFile, batch_pb2.DeleteFileRequest(id=file_id), idempotent=False)

    def create(self, input_file_id: str, endpoint: str = "/v1/chat/completions", completion_window: str = "24h",
               metadata: dict[str, str] | None = None) -> batch_pb2.Batch:
        request = batch_pb2.CreateBatchRequest(input_file_id=input_file_id, endpoint=endpoint,
                                               completion_window=completion_window, metadata=metadata or {})
        return self._call.unary(self._stub.CreateBatch, request, idempotent=False).batch

    def get(self, batch_id: str) -> batch_pb2.Batch:
        return self._call.unary(self._stub.GetBatch, batch_pb2.GetBatchRequest(id=batch_id), idempotent=True).batch

    def list(self, page_size: int = 20) -> Iterator[batch_pb2.Batch]:
        """Batches, newest first, fetched a page at a time."""
        after = ""
        while True:
            page = self._call.unary(self._stub.ListBatches, batch_pb2.ListBatchesRequest(
                after=after, limit=page_size), idempotent=True)
            yield from page.batches
            if not page.has_more or not page.batches:
                return
            after = page.batches[-1].id

    def cancel(self, batch_id: str) -> batch_pb2.Batch:
        return self._call.unary(self._stub.CancelBatch, batch_pb2.CancelBatchRequest(id=batch_id),
                                idempotent=True).batch

    def wait(self, batch_id: str, timeout_s: float = 24 * 3600.0, poll_s: float = 1.0) -> batch_pb2.Batch:
        """The batch once it has ended (completed, failed, expired or cancelled); DeadlineExceeded otherwise."""
        deadline = time.monotonic() + timeout_s
        while True:
            batch = self.get(batch_id)
            if batch.status in ENDED:
                return batch
            if time.monotonic() + poll_s > deadline:
                raise DeadlineExceeded(f"batch {batch_id} has not ended within {timeout_s:g}s")
            time.sleep(poll_s)

    # builtins.list: `list` in this class is the method above.
    def results(self, batch_id: str) -> tuple[builtins.list[dict[str, Any]], builtins.list[dict[str, Any]]]:
        """(output lines, error lines) of a batch that has ended; ([], []) for files it does not have."""
        batch = self.get(batch_id)
        return ([] if not batch.output_file_id else parse_lines(self.content(batch.output_file_id)),
                [] if not batch.error_file_id else parse_lines(self.content(batch.error_file_id)))


class AsyncBatches:
    """`Batches` for the asyncio client."""

    def __init__(self, caller: Any, stub: batch_pb2_grpc.BatchServiceStub) -> None:
        self._call, self._stub = caller, stub

    async def upload(self, source: bytes | str | pathlib.Path, filename: str = "") -> batch_pb2.BatchFile:
        content, name = await asyncio.to_thread(_content, source)
        request = batch_pb2.CreateFileRequest(filename=filename or name, purpose="batch", content=content)
        return (await self._call.unary(self._stub.CreateFile, request, idempotent=False,
                                       timeout_s=UPLOAD_TIMEOUT_S)).file

    async def file(self, file_id: str) -> batch_pb2.BatchFile:
        return (await self._call.unary(self._stub.GetFile, batch_pb2.GetFileRequest(id=file_id),
                                       idempotent=True)).file

    async def content(self, file_id: str) -> bytes:
        return (await self._call.unary(self._stub.GetFileContent, batch_pb2.GetFileContentRequest(id=file_id),
                                       idempotent=True, timeout_s=UPLOAD_TIMEOUT_S)).content

    async def delete_file(self, file_id: str) -> None:
        await self._call.unary(self._stub.DeleteFile, batch_pb2.DeleteFileRequest(id=file_id), idempotent=False)

    async def create(self, input_file_id: str, endpoint: str = "/v1/chat/completions",
                     completion_window: str = "24h", metadata: dict[str, str] | None = None) -> batch_pb2.Batch:
        request = batch_pb2.CreateBatchRequest(input_file_id=input_file_id, endpoint=endpoint,
                                               completion_window=completion_window, metadata=metadata or {})
        return (await self._call.unary(self._stub.CreateBatch, request, idempotent=False)).batch

    async def get(self, batch_id: str) -> batch_pb2.Batch:
        return (await self._call.unary(self._stub.GetBatch, batch_pb2.GetBatchRequest(id=batch_id),
                                       idempotent=True)).batch

    async def list_page(self, after: str = "", limit: int = 20) -> batch_pb2.ListBatchesResponse:
        return await self._call.unary(self._stub.ListBatches, batch_pb2.ListBatchesRequest(after=after, limit=limit),
                                      idempotent=True)

    async def cancel(self, batch_id: str) -> batch_pb2.Batch:
        return (await self._call.unary(self._stub.CancelBatch, batch_pb2.CancelBatchRequest(id=batch_id),
                                       idempotent=True)).batch

    async def wait(self, batch_id: str, timeout_s: float = 24 * 3600.0, poll_s: float = 1.0) -> batch_pb2.Batch:
        deadline = time.monotonic() + timeout_s
        while True:
            batch = await self.get(batch_id)
            if batch.status in ENDED:
                return batch
            if time.monotonic() + poll_s > deadline:
                raise DeadlineExceeded(f"batch {batch_id} has not ended within {timeout_s:g}s")
            await asyncio.sleep(poll_s)
