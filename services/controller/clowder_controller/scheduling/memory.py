"""Filter: the replica's memory (model weights plus KV cache for its context) must fit the node's free memory.

The estimate comes from the model's GGUF metadata (layers, embedding size,
heads, KV heads), which the controller reads from file:// sources into
Image.model_shape; without it, the weights plus a fixed margin stand in.
"""

from __future__ import annotations

import pathlib
from typing import ClassVar, Sequence

from clowder.controller.v1 import resources_pb2
from clowder_common.plugins import Plugin
from clowder_common.runtime_settings import DEFAULT_CONTEXT_SIZE, RuntimeSettings, resolve, with_defaults
from clowder_controller.scheduling.framework import Filter, NodeInfo, PlacementRequest

# The runtime's context when nothing sets one.
DEFAULT_CONTEXT = DEFAULT_CONTEXT_SIZE
# llama.cpp compute buffers, tokenizer and the runtime's own Python: a fixed floor ...
OVERHEAD_BYTES = 64 << 20
# ... plus a share of the weights for scratch buffers that grow with the model.
OVERHEAD_FRACTION = 0.1
# KV cache entries are f16.
KV_BYTES_PER_VALUE = 2


def kv_cache_bytes(shape: resources_pb2.ModelShape, context: int) -> int:
    """K and V for every layer and position: 2 * layers * context * kv_heads * head_dim * 2 bytes."""
    if not (shape.layers and shape.embedding_length and shape.heads):
        return 0
    head_dim = shape.embedding_length // shape.heads
    kv_heads = shape.kv_heads or shape.heads
    return 2 * shape.layers * context * kv_heads * head_dim * KV_BYTES_PER_VALUE


def estimate_memory(image: resources_pb2.Image, deployment: resources_pb2.Deployment,
                    cluster: RuntimeSettings = RuntimeSettings()) -> int:
    """Bytes one replica of `deployment` needs; the deployment's own figure wins when set.

    The KV cache holds context_size tokens for each slot, with slots and context resolved as the runtime gets
    them (deployment, aimage, `cluster` defaults, the runtime's defaults).
    """
    if deployment.memory_bytes:
        return deployment.memory_bytes
    weights = image.size_bytes or image.model_shape.file_bytes
    if not weights:
        return 0
    settings = with_defaults(resolve(deployment, image.configuration, cluster))
    kv = kv_cache_bytes(image.model_shape, settings.context_size * settings.slots)
    return int(weights * (1 + OVERHEAD_FRACTION)) + OVERHEAD_BYTES + kv


def read_model_shape(path: pathlib.Path) -> resources_pb2.ModelShape:
    """Blocking (parses the GGUF header and tensor table): call it from an executor."""
    import gguf  # imported here: parsing is rare and the module is heavy

    reader = gguf.GGUFReader(str(path))

    def field(name: str) -> int:
        value = reader.fields.get(name)
        return int(value.contents()) if value is not None else 0

    arch = reader.fields["general.architecture"].contents()
    return resources_pb2.ModelShape(
        layers=field(f"{arch}.block_count"),
        embedding_length=field(f"{arch}.embedding_length"),
        heads=field(f"{arch}.attention.head_count"),
        kv_heads=field(f"{arch}.attention.head_count_kv"),
        train_context=field(f"{arch}.context_length"),
        file_bytes=path.stat().st_size,
    )


def _gib(size: int) -> str:
    return f"{size / (1 << 30):.2f} GiB"


class MemoryFit(Plugin, Filter):
    TYPE: ClassVar[str] = "memory"

    def filter(self, request: PlacementRequest, nodes: Sequence[NodeInfo]) -> list[NodeInfo]:
        need = request.memory_bytes
        if not need:
            return list(nodes)
        out = []
        for n in nodes:
            total = n.node.memory_bytes
            if not total or total - n.allocated_memory >= need:
                out.append(n)
        return out

    def reason(self, request: PlacementRequest, rejected: int) -> str:
        return f"{rejected} without {_gib(request.memory_bytes)} of free memory"
