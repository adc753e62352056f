"""The Files and Batches API's operations, shared by the HTTP and gRPC faces: who may see what, and validation."""

from __future__ import annotations

import logging
import secrets
import time
from dataclasses import dataclass

from clowder.balancer.v1 import batch_pb2
from clowder_common.errors import FailedPrecondition, InvalidArgument, NotFound, Unavailable

from clowder_balancer.apikeys import Principal
from clowder_balancer.batch.blobs import BlobClient, holder_of
from clowder_balancer.batch.shapes import ENDED, STATUS_NAMES
from clowder_balancer.batch.store import BatchStore, batch_not_found, file_not_found
from clowder_balancer.batch.validation import ENDPOINTS, Line, parse_input

log = logging.getLogger(__name__)

S = batch_pb2
COMPLETION_WINDOWS = {"24h": 24 * 3600}
PURPOSE_INPUT, PURPOSE_OUTPUT = "batch", "batch_output"
MAX_METADATA_PAIRS, MAX_METADATA_KEY, MAX_METADATA_VALUE = 16, 64, 512
MAX_FILENAME = 255


@dataclass(frozen=True)
class BatchSettings:
    max_file_bytes: int = 100 * 1024 * 1024
    chunk_lines: int = 16
    max_in_flight: int = 16
    reserve_slots: int = 1
    claim_ttl_s: int = 5
    # Tries of one invocation that failed for a passing reason (no ready replica, 5xx) before it is recorded.
    max_attempts: int = 3


def new_id(prefix: str) -> str:
    return prefix + secrets.token_hex(12)


class BatchApi:
    def __init__(self, store: BatchStore, blobs: BlobClient, settings: BatchSettings) -> None:
        self.store = store
        self.blobs = blobs
        self.settings = settings

    # -- files -----------------------------------------------------------------------------------

    async def create_file(self, principal: Principal, filename: str, purpose: str, content: bytes,
                          file_id: str = "") -> batch_pb2.BatchFile:
        if purpose not in (PURPOSE_INPUT, PURPOSE_OUTPUT) or (purpose == PURPOSE_OUTPUT and not file_id):
            raise InvalidArgument(f"Invalid purpose '{purpose}': this server keeps files for 'batch' only.",
                                  field="purpose")
        if len(content) > self.settings.max_file_bytes:
            raise InvalidArgument(f"File is too large: {len(content)} bytes, at most {self.settings.max_file_bytes}.",
                                  field="file", reason="FILE_TOO_LARGE")
        if not filename or len(filename) > MAX_FILENAME:
            raise InvalidArgument("The file needs a name of at most 255 characters.", field="file")
        file_id = file_id or new_id("file-")
        digest, node = await self.blobs.put(content, holder_of(file_id))
        f = S.BatchFile(id=file_id, bytes=len(content), created_at=int(time.time()), filename=filename,
                        purpose=purpose, digest=digest, node=node, owner=principal.key_id)
        await self.store.create_file(f)
        return f

    async def get_file(self, principal: Principal, file_id: str) -> batch_pb2.BatchFile:
        f = await self.store.get_file(file_id)
        if f.owner != principal.key_id:
            # Another key's file does not exist for this caller (not even its id leaks).
            raise file_not_found(file_id)
        return f

    async def list_files(self, principal: Principal, after: str = "", limit: int = 10000, purpose: str = "",
                         ascending: bool = False) -> tuple[list[batch_pb2.BatchFile], bool]:
        files = [f for f in await self.store.list_files()
                 if f.owner == principal.key_id and (not purpose or f.purpose == purpose)]
        files.sort(key=lambda f: (f.created_at, f.id), reverse=not ascending)
        return _page(files, after, limit)

    async def file_content(self, principal: Principal, file_id: str) -> bytes:
        f = await self.get_file(principal, file_id)
        return await self.blobs.read(f.node, f.digest)

    async def delete_file(self, principal: Principal, file_id: str) -> None:
        f = await self.get_file(principal, file_id)
        if not await self.store.delete_file(file_id):
            raise file_not_found(file_id)
        await self.blobs.unpin(f.node, holder_of(file_id))

    async def input_lines(self, batch: batch_pb2.Batch) -> tuple[list[Line], list[batch_pb2.BatchError]]:
        f = await self.store.get_file(batch.input_file_id)
        return parse_input(await self.blobs.read(f.node, f.digest), batch.endpoint)

    # -- batches ---------------------------------------------------------------------------------

    async def create_batch(self, principal: Principal, input_file_id: str, endpoint: str, completion_window: str,
                           metadata: dict[str, str]) -> batch_pb2.Batch:
        if not input_file_id:
            raise InvalidArgument("Missing required parameter: 'input_file_id'.", field="input_file_id")
        if endpoint not in ENDPOINTS:
            raise InvalidArgument(f"Invalid value for 'endpoint': expected one of {sorted(ENDPOINTS)}.",
                                  field="endpoint")
        if completion_window not in COMPLETION_WINDOWS:
            raise InvalidArgument("Invalid value for 'completion_window': only '24h' is supported.",
                                  field="completion_window")
        _check_metadata(metadata)
        f = await self.get_file(principal, input_file_id)
        if f.purpose != PURPOSE_INPUT:
            raise InvalidArgument(f"File {input_file_id} has purpose '{f.purpose}'; a batch needs a 'batch' file.",
                                  field="input_file_id")
        now = int(time.time())
        batch = S.Batch(id=new_id("batch_"), endpoint=endpoint, input_file_id=input_file_id,
                        completion_window=completion_window, status=S.BATCH_STATUS_VALIDATING, created_at=now,
                        expires_at=now + COMPLETION_WINDOWS[completion_window], owner=principal.key_id,
                        metadata=metadata)
        await self.store.create_batch(batch)
        # Validated here, so a caller sees `failed` or `in_progress` at once; a balancer that dies before the
        # verdict, or storage that does not answer now, leaves it `validating`, and a worker validates it later
        # (an error here would have the client create the batch again).
        try:
            return await self.validate(batch.id)
        except Unavailable as err:
            log.warning("batch %s: validation deferred: %s", batch.id, err.message)
            return batch

    async def validate(self, batch_id: str) -> batch_pb2.Batch:
        batch = (await self.store.get_batch(batch_id)).value
        if batch.status != S.BATCH_STATUS_VALIDATING:
            return batch
        try:
            lines, errors = await self.input_lines(batch)
        except NotFound as err:
            # The input file (or its content) is gone: nothing will ever validate it.
            lines, errors = [], [batch_pb2.BatchError(code="input_file_missing", message=err.message,
                                                      param="input_file_id")]
        now = int(time.time())

        def verdict(b: batch_pb2.Batch) -> bool:
            if b.status != S.BATCH_STATUS_VALIDATING:
                return False
            if errors:
                b.status, b.failed_at = S.BATCH_STATUS_FAILED, now
                b.errors.extend(errors)
            else:
                b.status, b.in_progress_at = S.BATCH_STATUS_IN_PROGRESS, now
                b.request_counts.total = len(lines)
            return True

        batch = await self.store.mutate(batch_id, verdict)
        log.info("batch %s: %s (%d requests, %d errors)", batch_id, STATUS_NAMES[batch.status], len(lines),
                 len(errors))
        return batch

    async def get_batch(self, principal: Principal, batch_id: str) -> batch_pb2.Batch:
        batch = (await self.store.get_batch(batch_id)).value
        if batch.owner != principal.key_id:
            raise batch_not_found(batch_id)
        return batch

    async def list_batches(self, principal: Principal, after: str = "", limit: int = 20
                           ) -> tuple[list[batch_pb2.Batch], bool]:
        batches = [b for b in await self.store.list_batches() if b.owner == principal.key_id]
        batches.sort(key=lambda b: (b.created_at, b.id), reverse=True)
        return _page(batches, after, limit)

    async def cancel_batch(self, principal: Principal, batch_id: str) -> batch_pb2.Batch:
        await self.get_batch(principal, batch_id)
        now = int(time.time())
        refused: list[int] = []

        def cancel(b: batch_pb2.Batch) -> bool:
            if b.status in (S.BATCH_STATUS_VALIDATING, S.BATCH_STATUS_IN_PROGRESS):
                b.status, b.cancelling_at = S.BATCH_STATUS_CANCELLING, now
                return True
            if b.status in ENDED:
                refused.append(b.status)
            return False

        batch = await self.store.mutate(batch_id, cancel)
        if refused:
            raise FailedPrecondition(f"Cannot cancel a batch with status '{STATUS_NAMES[refused[0]]}'.",
                                     reason="BATCH_ENDED", metadata={"id": batch_id})
        return batch


def _page(items: list, after: str, limit: int) -> tuple[list, bool]:
    if after:
        ids = [i.id for i in items]
        items = items[ids.index(after) + 1:] if after in ids else []
    return items[:limit], len(items) > limit


def _check_metadata(metadata: dict[str, str]) -> None:
    if len(metadata) > MAX_METADATA_PAIRS:
        raise InvalidArgument(f"'metadata' takes at most {MAX_METADATA_PAIRS} pairs.", field="metadata")
    for key, value in metadata.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise InvalidArgument("'metadata' keys and values must be strings.", field="metadata")
        if len(key) > MAX_METADATA_KEY or len(value) > MAX_METADATA_VALUE:
            raise InvalidArgument(f"'metadata' keys take at most {MAX_METADATA_KEY} characters, values "
                                  f"{MAX_METADATA_VALUE}.", field="metadata")
