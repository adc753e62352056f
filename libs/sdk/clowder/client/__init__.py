"""Clowder's Python SDK: sync and asyncio clients for the control plane and for inference."""

from clowder_common.errors import (AlreadyExists, ClowderError, DeadlineExceeded, FailedPrecondition, InvalidArgument,
                                   NotFound, PermissionDenied, Unauthenticated, Unavailable)

from clowder.client._settings import Settings
from clowder.client._shared import Choice, Chunk, Completion, Embeddings, TokenLogprob, ToolCall, TopLogprob, Usage
from clowder.client.aio import AsyncClient
from clowder.client.sync import Client

__all__ = ["Client", "AsyncClient", "Settings", "Chunk", "Choice", "Completion", "Embeddings", "TokenLogprob",
           "ToolCall", "TopLogprob", "Usage", "ClowderError", "AlreadyExists",
           "DeadlineExceeded", "FailedPrecondition", "InvalidArgument", "NotFound", "PermissionDenied",
           "Unauthenticated", "Unavailable"]
