"""ImageService: aimages stored in etcd, and pulls onto nodes with progress."""

from __future__ import annotations

import asyncio
import logging
import pathlib
import urllib.parse
import urllib.request

from clowder.controller.v1 import controller_pb2, controller_pb2_grpc, resources_pb2
from clowder_common import keys
from clowder_common.errors import FailedPrecondition, InvalidArgument, NotFound, Unavailable
from clowder_common.etcd import EtcdState
from clowder_controller.pagination import paginate
from clowder_controller.scheduling.memory import read_model_shape
from clowder_controller.storage_client import StorageClients
from clowder_controller.validation import runtime_violations, validate_image

log = logging.getLogger(__name__)

# Reading a GGUF's metadata parses its tensor table: seconds for big models, never forever.
SHAPE_TIMEOUT_S = 30


async def model_shape_of(source_url: str) -> resources_pb2.ModelShape | None:
    """The model's shape when the source is a file this controller can read; None otherwise.

    Best effort: a controller on another machine than the file simply estimates
    memory from the weights' size once pulled.
    """
    parsed = urllib.parse.urlsplit(source_url)
    if parsed.scheme != "file":
        return None
    path = pathlib.Path(urllib.request.url2pathname(parsed.path))
    if not path.is_file():
        return None
    loop = asyncio.get_running_loop()
    try:
        return await asyncio.wait_for(loop.run_in_executor(None, read_model_shape, path), SHAPE_TIMEOUT_S)
    except Exception as exc:  # not a GGUF, truncated, too slow: the pull will tell the user
        log.warning("cannot read GGUF metadata from %s: %s", path, exc)
        return None


async def get_image(state: EtcdState, alias: str):
    found = await state.get(state.key(keys.image(alias)), resources_pb2.Image)
    if found is None:
        raise NotFound(f"image {alias!r} not found", reason="IMAGE_NOT_FOUND", metadata={"alias": alias})
    return found


async def record_digest(state: EtcdState, alias: str, digest: str, size: int) -> None:
    """Remember what the source resolved to, so later pulls verify against it."""
    for _ in range(5):
        current = await state.get(state.key(keys.image(alias)), resources_pb2.Image)
        if current is None or (current.value.digest == digest and current.value.size_bytes == size):
            return
        updated = resources_pb2.Image()
        updated.CopyFrom(current.value)
        updated.digest, updated.size_bytes = digest, size
        if await state.update(current.key, updated, current.mod_revision):
            return


async def largest_node_cpus(state: EtcdState) -> int:
    """The most CPUs a registered node reports: a replica can use no more threads. 0 with no node registered."""
    nodes, _ = await state.list(state.key(keys.NODES), resources_pb2.Node)
    return max((n.value.cpus for n in nodes), default=0)


async def pick_node(state: EtcdState, name: str) -> resources_pb2.Node:
    nodes, _ = await state.list(state.key(keys.NODES), resources_pb2.Node)
    if name:
        for node in nodes:
            if node.value.name == name:
                return node.value
        raise NotFound(f"node {name!r} is not registered", reason="NODE_NOT_FOUND", metadata={"node": name})
    if not nodes:
        raise Unavailable("no storage node is registered yet", reason="NO_NODES", retry_after=2.0)
    return nodes[0].value


class ImageServicer(controller_pb2_grpc.ImageServiceServicer):
    def __init__(self, state: EtcdState, storage: StorageClients) -> None:
        self._state = state
        self._storage = storage

    async def CreateImage(self, request, context):
        image = resources_pb2.Image()
        image.CopyFrom(request.image)
        # Output-only fields are ours to set, whatever the client sent.
        image.ClearField("digest")
        image.ClearField("size_bytes")
        image.ClearField("model_shape")
        validate_image(image, await largest_node_cpus(self._state))
        shape = await model_shape_of(image.source_url)
        if shape is not None:
            image.model_shape.CopyFrom(shape)
            # Only now is the model's own context known.
            violations = runtime_violations(image.configuration, "image.configuration",
                                            train_context=shape.train_context)
            if violations:
                raise InvalidArgument("invalid image configuration", violations=violations)
        image.create_time.GetCurrentTime()
        await self._state.create(self._state.key(keys.image(image.alias)), image)
        log.info("image %s created from %s", image.alias, image.source_url)
        return controller_pb2.CreateImageResponse(image=image)

    async def GetImage(self, request, context):
        found = await get_image(self._state, request.alias)
        return controller_pb2.GetImageResponse(image=found.value)

    async def ListImages(self, request, context):
        items, _ = await self._state.list(self._state.key(keys.IMAGES), resources_pb2.Image)
        page, token = paginate([(i.value.alias, i.value) for i in items], request.page_size, request.page_token)
        return controller_pb2.ListImagesResponse(images=page, next_page_token=token)

    async def DeleteImage(self, request, context):
        found = await get_image(self._state, request.alias)
        deployments, _ = await self._state.list(self._state.key(keys.DEPLOYMENTS), resources_pb2.Deployment)
        users = sorted(d.value.name for d in deployments if d.value.image == request.alias)
        if users:
            raise FailedPrecondition(
                f"image {request.alias!r} is used by deployment(s) {', '.join(users)}; delete them first",
                reason="IMAGE_IN_USE",
                metadata={"deployments": ",".join(users)},
            )
        # Compare on the revision we checked, so a concurrent update is not silently lost.
        if not await self._state.delete(found.key, found.mod_revision):
            raise FailedPrecondition(f"image {request.alias!r} changed while deleting; try again",
                                     reason="CONCURRENT_MODIFICATION")
        log.info("image %s deleted", request.alias)
        return controller_pb2.DeleteImageResponse()

    async def PullImage(self, request, context):
        image = (await get_image(self._state, request.alias)).value
        node = await pick_node(self._state, request.node)
        async for message in self._storage.pull_image(node.storage_address, image):
            if message.HasField("blob"):
                await record_digest(self._state, image.alias, message.blob.digest, message.blob.size_bytes)
            yield controller_pb2.PullImageResponse(node=node.name, progress=message.progress, blob=message.blob
                                                   if message.HasField("blob") else None)
