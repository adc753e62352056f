"""How an aimage arrives: its layers pulled from their URLs, or the whole image from an OCI registry.

Blobs are pinned for the pull while it runs, so the space keeper cannot evict a layer that the manifest
written at the end will name.
"""

from __future__ import annotations

import asyncio
import json
import logging
import posixpath
import urllib.parse
import uuid
from typing import AsyncGenerator

from clowder_common.errors import DataLoss, InvalidArgument

from clowder_storage.images import (
    MAX_CONFIG_BYTES, MEDIA_CONFIG, MEDIA_MODEL, SOURCE, TITLE, Descriptor, ImageIndex, ImageView, LayerSpec,
    LayerUpdate, Manifest, validate_image_name,
)
from clowder_storage.oci import OciClient, parse_oci
from clowder_storage.puller import Pulled, Puller
from clowder_storage.sources import Credential, redact_url
from clowder_storage.space import Space
from clowder_storage.store import BlobStore, parse_digest

log = logging.getLogger(__name__)

# (source URL, expected digest or "", credential) of one blob to pull.
BlobSpec = tuple[str, str, Credential]


class ImagePuller:
    """Pulls aimages into the store and names them in the index."""

    def __init__(self, store: BlobStore, index: ImageIndex, puller: Puller, space: Space, registry: OciClient) -> None:
        self._store = store
        self._index = index
        self._puller = puller
        self._space = space
        self._registry = registry

    async def pull(self, name: str, layers: list[LayerSpec],
                   configuration_json: str) -> AsyncGenerator[LayerUpdate | ImageView, None]:
        """Pull every layer (in parallel), then write config and manifest; progress per layer, the image last."""
        validate_image_name(name)
        if not layers:
            raise InvalidArgument("an aimage needs at least one layer", field="layers")
        if not any(layer.media_type == MEDIA_MODEL for layer in layers):
            raise InvalidArgument("an aimage needs at least one model layer", field="layers")
        config_bytes = canonical_config(configuration_json)
        for i, layer in enumerate(layers):
            if layer.expected_digest:
                parse_digest(layer.expected_digest, field=f"layers[{i}].expected_digest")
            self._puller.check(layer.source_url)
        done: dict[int, Pulled] = {}
        specs = [(layer.source_url, layer.expected_digest, layer.credential) for layer in layers]
        holder = f"pull:{uuid.uuid4().hex}"
        try:
            async for update in self._pull_blobs(specs, holder, done):
                yield update
            config = await self._store.run(self._store.put_bytes_sync, config_bytes, None)
            await self._space.pin(holder, [config.digest])
            descriptors = []
            for i, layer in enumerate(layers):
                blob = done[i].blob
                annotations = {SOURCE: redact_url(layer.source_url)}
                title = posixpath.basename(urllib.parse.urlsplit(layer.source_url).path)
                if title:
                    annotations[TITLE] = title
                descriptors.append(Descriptor(layer.media_type, blob.digest, blob.size_bytes, annotations))
            manifest = Manifest(Descriptor(MEDIA_CONFIG, config.digest, config.size_bytes), tuple(descriptors))
            yield await self._index.add(name, manifest.to_bytes())
        finally:
            await self._space.unpin(holder)

    async def pull_oci(self, name: str, url: str, credential: Credential
                       ) -> AsyncGenerator[LayerUpdate | ImageView, None]:
        """The image at oci://REGISTRY/REPO:TAG (or @sha256:...): its manifest, then config and layers by digest."""
        ref = parse_oci(url, field="source_url")
        manifest_digest, data = await self._registry.fetch_manifest(ref, credential)
        manifest = Manifest.parse(data)
        log.info("pulling %s from oci://%s/%s (manifest %s)", name, ref.registry, ref.repository, manifest_digest)
        blobs = [manifest.config, *manifest.layers]
        base = f"oci://{ref.registry}/{ref.repository}@"
        specs = [(base + d.digest, d.digest, credential) for d in blobs]
        done: dict[int, Pulled] = {}
        holder = f"pull:{uuid.uuid4().hex}"
        try:
            async for update in self._pull_blobs(specs, holder, done):
                # Index 0 is the config: -1 on the wire, layers keep their manifest index.
                yield LayerUpdate(update.index - 1, update.digest, update.progress)
            for i, d in enumerate(blobs):
                if done[i].blob.size_bytes != d.size:
                    raise DataLoss(f"blob {d.digest} is {done[i].blob.size_bytes} bytes, the manifest says {d.size}")
            yield await self._index.add(name, data)
        finally:
            await self._space.unpin(holder)

    async def _pull_blobs(self, specs: list[BlobSpec], holder: str,
                          done: dict[int, Pulled]) -> AsyncGenerator[LayerUpdate, None]:
        """Pull blobs in parallel, merging their progress; each stored blob is pinned for `holder` (the caller
        unpins once a manifest names them) and recorded in `done` by index."""
        queue: asyncio.Queue[LayerUpdate | tuple[int, Pulled]] = asyncio.Queue()

        async def one(index: int, url: str, expected: str, credential: Credential) -> None:
            async for update in self._puller.pull(url, expected, credential):
                if isinstance(update, Pulled):
                    await self._space.pin(holder, [update.blob.digest])
                    await queue.put((index, update))
                else:
                    await queue.put(LayerUpdate(index, "", update))

        tasks = [asyncio.create_task(one(i, *spec), name=f"layer {i}") for i, spec in enumerate(specs)]
        try:
            while len(done) < len(specs):
                getter = asyncio.ensure_future(queue.get())
                failed = [t for t in tasks if t.done() and not t.cancelled() and t.exception() is not None]
                if failed:
                    getter.cancel()
                    raise failed[0].exception()  # type: ignore[misc]
                await asyncio.wait({getter, *[t for t in tasks if not t.done()]},
                                   return_when=asyncio.FIRST_COMPLETED)
                if not getter.done():
                    getter.cancel()
                    continue
                item = getter.result()
                if isinstance(item, tuple):
                    index, pulled = item
                    done[index] = pulled
                    yield LayerUpdate(index, pulled.blob.digest, pulled.progress)
                else:
                    yield item
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)


def canonical_config(configuration_json: str) -> bytes:
    """The image's configuration as canonical JSON bytes: the same settings always give the same config digest."""
    if len(configuration_json) > MAX_CONFIG_BYTES:
        raise InvalidArgument("configuration_json is larger than 1 MiB", field="configuration_json")
    try:
        value = json.loads(configuration_json or "{}")
    except ValueError as exc:
        raise InvalidArgument(f"configuration_json is not JSON: {exc}", field="configuration_json") from None
    if not isinstance(value, dict):
        raise InvalidArgument("configuration_json must be a JSON object", field="configuration_json")
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()
