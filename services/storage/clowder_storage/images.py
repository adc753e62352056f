"""Aimages in the store's OCI image layout: manifests with Clowder media types, named in index.json."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import re
from typing import Any

from clowder_common.errors import ClowderError, FailedPrecondition, InvalidArgument, NotFound

from clowder_storage.puller import Progress
from clowder_storage.sources import NO_CREDENTIAL, Credential
from clowder_storage.store import BlobStore, _write_atomic, parse_digest

log = logging.getLogger(__name__)

MEDIA_INDEX = "application/vnd.oci.image.index.v1+json"
MEDIA_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MEDIA_MODEL = "application/vnd.clowder.model.layer.v1+gguf"
MEDIA_ADAPTER = "application/vnd.clowder.adapter.layer.v1+gguf"
MEDIA_CONFIG = "application/vnd.clowder.config.v1+json"
ARTIFACT_TYPE = "application/vnd.clowder.aimage.v1"
LAYER_MEDIA_TYPES = (MEDIA_MODEL, MEDIA_ADAPTER)
REF_NAME = "org.opencontainers.image.ref.name"
TITLE = "org.opencontainers.image.title"
SOURCE = "io.clowder.layer.source"
MAX_MANIFEST_BYTES = 4 << 20
MAX_CONFIG_BYTES = 1 << 20
# Aliases as the controller names them, optionally with a ":tag"; no '/' so a name can never be a path.
NAME_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,127}(:[A-Za-z0-9_][A-Za-z0-9._-]{0,127})?")


def validate_image_name(name: str, field: str = "name") -> str:
    if not NAME_RE.fullmatch(name or ""):
        raise InvalidArgument(
            f"{field} {name[:80]!r} is not an image name: lowercase letters, digits, '.', '_' or '-'"
            " (up to 128), optionally ':tag'", field=field)
    return name


@dataclasses.dataclass(frozen=True)
class Descriptor:
    media_type: str
    digest: str
    size: int
    annotations: dict[str, str] = dataclasses.field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"mediaType": self.media_type, "digest": self.digest, "size": self.size}
        if self.annotations:
            out["annotations"] = dict(sorted(self.annotations.items()))
        return out

    @classmethod
    def from_json(cls, raw: Any, field: str) -> Descriptor:
        if not isinstance(raw, dict):
            raise InvalidArgument(f"{field} is not a descriptor object", field=field)
        media_type, digest, size = raw.get("mediaType"), raw.get("digest"), raw.get("size")
        if not isinstance(media_type, str) or not isinstance(size, int) or size < 0:
            raise InvalidArgument(f"{field} needs mediaType and a non-negative size", field=field)
        if not isinstance(digest, str):
            digest = ""
        parse_digest(digest, field=field)
        annotations = raw.get("annotations") or {}
        if not isinstance(annotations, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in annotations.items()):
            raise InvalidArgument(f"{field} annotations must map strings to strings", field=field)
        return cls(media_type, digest, size, annotations)


@dataclasses.dataclass(frozen=True)
class Manifest:
    config: Descriptor
    layers: tuple[Descriptor, ...]

    def to_bytes(self) -> bytes:
        body = {
            "schemaVersion": 2,
            "mediaType": MEDIA_MANIFEST,
            "artifactType": ARTIFACT_TYPE,
            "config": self.config.to_json(),
            "layers": [layer.to_json() for layer in self.layers],
        }
        # Canonical bytes: the same aimage always gets the same manifest digest.
        return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def parse(cls, data: bytes) -> Manifest:
        try:
            raw = json.loads(data)
        except ValueError:
            raise InvalidArgument("manifest is not JSON", field="manifest") from None
        if not isinstance(raw, dict) or raw.get("schemaVersion") != 2:
            raise InvalidArgument("manifest is not an OCI image manifest (schemaVersion 2)", field="manifest")
        if raw.get("mediaType", MEDIA_MANIFEST) != MEDIA_MANIFEST:
            raise InvalidArgument(f"manifest media type {raw.get('mediaType')!r} is not supported",
                                  field="manifest")
        config = Descriptor.from_json(raw.get("config"), "manifest.config")
        if config.media_type != MEDIA_CONFIG:
            raise InvalidArgument(f"manifest config has media type {config.media_type!r}, not an aimage's",
                                  field="manifest.config")
        layers = raw.get("layers")
        if not isinstance(layers, list) or not layers:
            raise InvalidArgument("manifest has no layers", field="manifest.layers")
        parsed = tuple(Descriptor.from_json(layer, f"manifest.layers[{i}]") for i, layer in enumerate(layers))
        for i, layer in enumerate(parsed):
            if layer.media_type not in LAYER_MEDIA_TYPES:
                raise InvalidArgument(f"manifest layer {i} has media type {layer.media_type!r}",
                                      field=f"manifest.layers[{i}]")
        if not any(layer.media_type == MEDIA_MODEL for layer in parsed):
            raise InvalidArgument("manifest has no model layer", field="manifest.layers")
        return cls(config, parsed)

    def digests(self) -> set[str]:
        return {self.config.digest, *(layer.digest for layer in self.layers)}


@dataclasses.dataclass(frozen=True)
class LayerSpec:
    media_type: str
    source_url: str
    expected_digest: str = ""
    credential: Credential = NO_CREDENTIAL


@dataclasses.dataclass(frozen=True)
class LayerUpdate:
    # -1: the config or manifest.
    index: int
    digest: str
    progress: Progress


@dataclasses.dataclass(frozen=True)
class ImageView:
    name: str
    manifest_digest: str
    manifest_size: int
    manifest: Manifest
    configuration_json: str
    complete: bool
    # digest -> local path (resolve only).
    paths: dict[str, str] = dataclasses.field(default_factory=dict)


class ImageIndex:
    """index.json and the manifests it names; every change of index.json is an atomic file replace.

    It knows only the store: how an image arrives (pulled layers, an OCI registry) is image_pulls.py.
    """

    def __init__(self, store: BlobStore) -> None:
        self._store = store
        self._index_path = store.root / "index.json"
        # name -> manifest descriptor, and manifest digest -> parsed manifest.
        self._names: dict[str, Descriptor] = {}
        self._manifests: dict[str, Manifest] = {}
        self._lock = asyncio.Lock()

    # -- index.json ---------------------------------------------------------------------

    def _load_sync(self) -> None:
        try:
            raw = json.loads(self._index_path.read_text())
        except FileNotFoundError:
            self._save_sync()
            return
        for i, entry in enumerate(raw.get("manifests", [])):
            try:
                desc = Descriptor.from_json(entry, f"index.manifests[{i}]")
                name = validate_image_name(desc.annotations.get(REF_NAME, ""))
                self._manifests[desc.digest] = Manifest.parse(
                    self._store.read_bytes_sync(desc.digest, MAX_MANIFEST_BYTES))
            except ClowderError as exc:
                log.warning("index.json entry %d skipped: %s", i, exc.message)
                continue
            self._names[name] = desc

    def _save_sync(self) -> None:
        body = {
            "schemaVersion": 2,
            "mediaType": MEDIA_INDEX,
            "manifests": [d.to_json() for _, d in sorted(self._names.items())],
        }
        _write_atomic(self._index_path, json.dumps(body, indent=1, sort_keys=True).encode(), self._store.tmp_dir)

    async def prepare(self) -> None:
        await self._store.run(self._load_sync)

    def referenced(self) -> set[str]:
        out = set()
        for desc in self._names.values():
            out.add(desc.digest)
            manifest = self._manifests.get(desc.digest)
            if manifest is not None:
                out |= manifest.digests()
        return out

    def metadata(self) -> set[str]:
        out = set()
        for desc in self._names.values():
            out.add(desc.digest)
            manifest = self._manifests.get(desc.digest)
            if manifest is not None:
                out.add(manifest.config.digest)
        return out

    # -- writing --------------------------------------------------------------------------

    async def add(self, name: str, manifest_bytes: bytes) -> ImageView:
        """Store a manifest whose blobs are all present and name it; replaces an older image of that name."""
        validate_image_name(name)
        manifest = Manifest.parse(manifest_bytes)
        for digest in manifest.digests():
            if await self._store.find(digest) is None:
                raise FailedPrecondition(f"blob {digest} of the manifest is not in the store",
                                         reason="BLOB_MISSING", metadata={"digest": digest})
        blob = await self._store.run(self._store.put_bytes_sync, manifest_bytes, None)
        async with self._lock:
            self._manifests[blob.digest] = manifest
            self._names[name] = Descriptor(MEDIA_MANIFEST, blob.digest, blob.size_bytes,
                                           {REF_NAME: name, "io.clowder.artifactType": ARTIFACT_TYPE})
            await self._store.run(self._save_sync)
        log.info("image %s is manifest %s", name, blob.digest)
        return await self.resolve(name)

    async def delete(self, name: str) -> None:
        validate_image_name(name)
        async with self._lock:
            if self._names.pop(name, None) is None:
                raise NotFound(f"image {name} is not in the store", metadata={"name": name})
            await self._store.run(self._save_sync)
        log.info("image %s removed from the index; its blobs go at the next garbage collection", name)

    # -- reading ---------------------------------------------------------------------------

    def _find(self, name: str) -> tuple[str, Descriptor]:
        if name.startswith("sha256:"):
            parse_digest(name, field="name")
            for known, desc in self._names.items():
                if desc.digest == name:
                    return known, desc
            raise NotFound(f"no stored image has manifest {name}", metadata={"name": name})
        validate_image_name(name)
        named = self._names.get(name)
        if named is None:
            raise NotFound(f"image {name} is not in the store", metadata={"name": name})
        return name, named

    async def _view(self, name: str, desc: Descriptor, with_paths: bool) -> ImageView:
        manifest = self._manifests[desc.digest]
        present = {d: await self._store.find(d) is not None for d in manifest.digests()}
        config_json = ""
        if present[manifest.config.digest]:
            config_json = (await self._store.run(self._store.read_bytes_sync, manifest.config.digest,
                                                 MAX_CONFIG_BYTES)).decode()
        paths = {}
        if with_paths:
            for layer in manifest.layers:
                paths[layer.digest] = str(self._store.path_of(layer.digest))
                await self._store.run(self._store.touch_sync, layer.digest)
        return ImageView(name, desc.digest, desc.size, manifest, config_json, all(present.values()), paths)

    async def resolve(self, name: str) -> ImageView:
        """The image with its layer paths; NOT_FOUND when absent or when a blob is missing (evicted)."""
        known, desc = self._find(name)
        view = await self._view(known, desc, with_paths=True)
        if not view.complete:
            raise NotFound(f"image {known} is incomplete on this node (a blob was evicted); pull it again",
                           reason="IMAGE_INCOMPLETE", metadata={"name": known})
        return view

    async def manifest_bytes(self, name: str) -> tuple[str, bytes]:
        _, desc = self._find(name)
        return desc.digest, await self._store.run(self._store.read_bytes_sync, desc.digest, MAX_MANIFEST_BYTES)

    async def list(self) -> list[ImageView]:
        return [await self._view(name, desc, with_paths=False) for name, desc in sorted(self._names.items())]
