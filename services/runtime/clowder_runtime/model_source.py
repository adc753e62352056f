"""Where the GGUF file is: a path given directly, or a digest the node's StorageService resolves."""

from __future__ import annotations

import os
import re

import grpc
from clowder.storage.v1 import storage_pb2, storage_pb2_grpc

from clowder_common.auth import bearer_metadata
from clowder_common.clients import aio_channel
from clowder_common.security import NO_SECURITY, ClusterSecurity
from clowder_common.errors import FailedPrecondition, InvalidArgument, from_rpc_error

DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$")
STORAGE_CALL_TIMEOUT_S = 10.0


async def resolve_model_path(
    model_path: str,
    digest: str,
    storage_address: str,
    admin_token: str | None,
    timeout: float = STORAGE_CALL_TIMEOUT_S,
    security: ClusterSecurity = NO_SECURITY,
) -> str:
    """The local file to load; the storage service's errors come back with their code and details."""
    if model_path:
        path = model_path
    elif digest and storage_address:
        if not DIGEST_RE.match(digest):
            raise InvalidArgument(f"digest {digest[:80]!r} is not 'sha256:<64 lowercase hex>'", field="digest")
        async with aio_channel(storage_address, security) as channel:
            stub = storage_pb2_grpc.StorageServiceStub(channel)
            try:
                reply = await stub.GetBlobPath(
                    storage_pb2.GetBlobPathRequest(digest=digest),
                    metadata=bearer_metadata(admin_token),
                    timeout=timeout,
                )
            except grpc.RpcError as exc:
                raise from_rpc_error(exc) from None
        path = reply.path
    else:
        raise InvalidArgument(
            "no model: give model_path, or digest together with storage_address", field="model_path"
        )
    if not os.path.isfile(path):
        raise FailedPrecondition(f"model file {path} does not exist", reason="MODEL_FILE_MISSING")
    return path
