"""Aimages in the store's OCI image layout: manifests, sharing, pins, garbage collection, eviction, verification."""

from __future__ import annotations

import json
import os

import grpc
import pytest

from clowder.storage.v1 import storage_pb2
from clowder_common.errors import from_rpc_error
from helpers.storage import CALL_TIMEOUT, digest_of, md, rpc_error, running_storage, stored_names

pytestmark = pytest.mark.inprocess

MODEL = storage_pb2.LAYER_KIND_MODEL
ADAPTER = storage_pb2.LAYER_KIND_ADAPTER


@pytest.fixture
def files(tmp_path):
    root = tmp_path / "files"
    root.mkdir()
    made = {}
    for name, size in (("base-00001-of-00002.gguf", 300_000), ("base-00002-of-00002.gguf", 200_000),
                       ("lora-a.gguf", 20_000), ("lora-b.gguf", 30_000)):
        data = os.urandom(size)
        (root / name).write_bytes(data)
        made[name] = (f"file://{root / name}", data)
    return made


@pytest.fixture
async def storage(tmp_path, etcd, etcd_prefix, state):
    async with running_storage(tmp_path, etcd, etcd_prefix, gc_grace_s=0) as running:
        yield running


def layer(files, name: str, kind=MODEL) -> storage_pb2.LayerSource:
    return storage_pb2.LayerSource(kind=kind, source_url=files[name][0])


async def pull_image(stub, name: str, layers, config: dict | None = None) -> list[storage_pb2.PullImageResponse]:
    request = storage_pb2.PullImageRequest(name=name, layers=layers, configuration_json=json.dumps(config or {}))
    return [m async for m in stub.PullImage(request, metadata=md(), timeout=CALL_TIMEOUT)]


async def test_aimage_is_an_oci_manifest_in_an_image_layout(storage, files):
    app, stub = storage
    layers = [layer(files, "base-00001-of-00002.gguf"), layer(files, "base-00002-of-00002.gguf"),
              layer(files, "lora-a.gguf", ADAPTER)]
    messages = await pull_image(stub, "smol", layers, {"system_prompt": "be brief", "context_size": 512})
    image = messages[-1].image
    # Progress came per layer, each layer ending with its digest.
    assert {m.layer.index for m in messages[:-1] if m.layer.digest} == {0, 1, 2}
    root = app.store.root
    assert json.loads((root / "oci-layout").read_text()) == {"imageLayoutVersion": "1.0.0"}
    index = json.loads((root / "index.json").read_text())
    assert index["mediaType"] == "application/vnd.oci.image.index.v1+json"
    [entry] = index["manifests"]
    assert entry["annotations"]["org.opencontainers.image.ref.name"] == "smol"
    assert entry["digest"] == image.manifest_digest
    manifest_bytes = (root / "blobs" / "sha256" / image.manifest_digest[7:]).read_bytes()
    assert digest_of(manifest_bytes) == image.manifest_digest
    manifest = json.loads(manifest_bytes)
    assert manifest["mediaType"] == "application/vnd.oci.image.manifest.v1+json"
    assert manifest["config"]["mediaType"] == "application/vnd.clowder.config.v1+json"
    assert [m["mediaType"] for m in manifest["layers"]] == [
        "application/vnd.clowder.model.layer.v1+gguf"] * 2 + ["application/vnd.clowder.adapter.layer.v1+gguf"]
    assert [m["digest"] for m in manifest["layers"]] == [
        digest_of(files[n][1]) for n in ("base-00001-of-00002.gguf", "base-00002-of-00002.gguf", "lora-a.gguf")]
    config = json.loads((root / "blobs" / "sha256" / manifest["config"]["digest"][7:]).read_bytes())
    assert config == {"context_size": 512, "system_prompt": "be brief"}

    resolved = (await stub.ResolveImage(storage_pb2.ResolveImageRequest(name="smol"), metadata=md())).image
    assert resolved.complete and json.loads(resolved.configuration_json) == config
    for stored, name in zip(resolved.layers, ("base-00001-of-00002.gguf", "base-00002-of-00002.gguf", "lora-a.gguf")):
        assert stored.title == name
        with open(stored.path, "rb") as handle:
            assert handle.read() == files[name][1]
    by_digest = await stub.ResolveImage(storage_pb2.ResolveImageRequest(name=image.manifest_digest), metadata=md())
    assert by_digest.image.name == "smol"


async def test_two_aimages_over_one_base_share_its_blob(storage, files):
    app, stub = storage
    base = layer(files, "base-00001-of-00002.gguf")
    await pull_image(stub, "a", [base, layer(files, "lora-a.gguf", ADAPTER)], {"system_prompt": "a"})
    await pull_image(stub, "b", [base, layer(files, "lora-b.gguf", ADAPTER)], {"system_prompt": "b"})
    images = (await stub.ListImages(storage_pb2.ListImagesRequest(), metadata=md())).images
    assert [i.name for i in images] == ["a", "b"] and all(i.complete for i in images)
    base_digest = digest_of(files["base-00001-of-00002.gguf"][1])
    assert images[0].layers[0].digest == images[1].layers[0].digest == base_digest
    # base, two adapters, two configs, two manifests: the base is stored once.
    assert len(stored_names(app)) == 7


async def test_gc_keeps_referenced_and_pinned_blobs(storage, files):
    app, stub = storage
    base = layer(files, "base-00001-of-00002.gguf")
    await pull_image(stub, "a", [base, layer(files, "lora-a.gguf", ADAPTER)], {"n": 1})
    await pull_image(stub, "b", [base, layer(files, "lora-b.gguf", ADAPTER)], {"n": 2})
    base_digest = digest_of(files["base-00001-of-00002.gguf"][1])
    await stub.DeleteImage(storage_pb2.DeleteImageRequest(name="a"), metadata=md())
    gc = await stub.CollectGarbage(storage_pb2.CollectGarbageRequest(), metadata=md())
    # a's adapter, config and manifest go; the shared base stays for b.
    assert len(gc.removed_digests) == 3 and digest_of(files["lora-a.gguf"][1]) in gc.removed_digests
    assert base_digest not in gc.removed_digests
    await stub.PinBlobs(storage_pb2.PinBlobsRequest(holder="replica-1", image="b"), metadata=md())
    await stub.DeleteImage(storage_pb2.DeleteImageRequest(name="b"), metadata=md())
    dry = await stub.CollectGarbage(storage_pb2.CollectGarbageRequest(), metadata=md())
    assert dry.removed_digests == []  # every blob of b is pinned by the runtime using it
    await stub.UnpinBlobs(storage_pb2.UnpinBlobsRequest(holder="replica-1"), metadata=md())
    gc = await stub.CollectGarbage(storage_pb2.CollectGarbageRequest(), metadata=md())
    assert base_digest in gc.removed_digests and stored_names(app) == []


async def test_verify_quarantines_a_corrupted_blob(storage, files):
    app, stub = storage
    await pull_image(stub, "a", [layer(files, "base-00001-of-00002.gguf")])
    digest = digest_of(files["base-00001-of-00002.gguf"][1])
    path = app.store.blob_dir / digest[7:]
    with open(path, "r+b") as handle:  # bit rot on disk
        handle.write(b"\0\0\0\0")
    result = await stub.VerifyBlobs(storage_pb2.VerifyBlobsRequest(), metadata=md())
    assert result.checked == 3 and list(result.quarantined_digests) == [digest]
    assert not path.exists() and len(list(app.store.quarantine_dir.iterdir())) == 1
    err = await rpc_error(stub.ResolveImage(storage_pb2.ResolveImageRequest(name="a"), metadata=md()))
    assert err.code() == grpc.StatusCode.NOT_FOUND and from_rpc_error(err).reason == "IMAGE_INCOMPLETE"
    # Pulling again repairs it.
    await pull_image(stub, "a", [layer(files, "base-00001-of-00002.gguf")])
    assert (await stub.ResolveImage(storage_pb2.ResolveImageRequest(name="a"), metadata=md())).image.complete


async def test_eviction_removes_least_recently_used_unpinned_blobs(tmp_path, etcd, etcd_prefix, state, files):
    async with running_storage(tmp_path, etcd, etcd_prefix, max_store_bytes=700_000, high_watermark=0.9,
                               low_watermark=0.5) as (app, stub):
        first = layer(files, "base-00001-of-00002.gguf")  # 300 kB
        second = layer(files, "base-00002-of-00002.gguf")  # 200 kB
        await pull_image(stub, "one", [first])
        await pull_image(stub, "two", [second])
        await stub.PinBlobs(storage_pb2.PinBlobsRequest(holder="r", image="two"), metadata=md())
        # 300 kB more would pass the high watermark: the unpinned, least recently used layer goes.
        big = os.urandom(300_000)
        (tmp_path / "files" / "more.gguf").write_bytes(big)
        request = storage_pb2.PullBlobRequest(source_url=f"file://{tmp_path / 'files' / 'more.gguf'}")
        [m async for m in stub.PullBlob(request, metadata=md(), timeout=CALL_TIMEOUT)]
        names = stored_names(app)
        assert digest_of(files["base-00001-of-00002.gguf"][1])[7:] not in names
        assert digest_of(files["base-00002-of-00002.gguf"][1])[7:] in names and digest_of(big)[7:] in names
        listed = {i.name: i.complete for i in
                  (await stub.ListImages(storage_pb2.ListImagesRequest(), metadata=md())).images}
        assert listed == {"one": False, "two": True}


async def test_index_and_pins_survive_a_restart(tmp_path, etcd, etcd_prefix, state, files):
    async with running_storage(tmp_path, etcd, etcd_prefix) as (_, stub):
        await pull_image(stub, "keep", [layer(files, "lora-a.gguf")])
        blob = await stub.PullBlob(storage_pb2.PullBlobRequest(source_url=files["lora-b.gguf"][0]),
                                   metadata=md(), timeout=CALL_TIMEOUT).read()
        await stub.PinBlobs(storage_pb2.PinBlobsRequest(holder="r", digests=[digest_of(files["lora-b.gguf"][1])]),
                            metadata=md())
    async with running_storage(tmp_path, etcd, etcd_prefix, gc_grace_s=0) as (app, stub):
        resolved = await stub.ResolveImage(storage_pb2.ResolveImageRequest(name="keep"), metadata=md())
        assert resolved.image.complete
        gc = await stub.CollectGarbage(storage_pb2.CollectGarbageRequest(), metadata=md())
        # The unreferenced blob stays: its pin was persisted.
        assert gc.removed_digests == [] and blob.blob.digest in {b.digest for b in app.store.list_sync()}


@pytest.mark.parametrize("name", ["../x", "A", "a/b", "", "x" * 200, "a:b/c"])
async def test_bad_image_names_are_invalid_argument(storage, files, name):
    _, stub = storage
    err = await rpc_error(pull_image(stub, name, [layer(files, "lora-a.gguf")]))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert from_rpc_error(err).violations[0].field == "name"


async def test_image_needs_a_model_layer_and_json_config(storage, files):
    _, stub = storage
    err = await rpc_error(pull_image(stub, "x", [layer(files, "lora-a.gguf", ADAPTER)]))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    request = storage_pb2.PullImageRequest(name="x", layers=[layer(files, "lora-a.gguf")], configuration_json="{")
    err = await rpc_error(stub.PullImage(request, metadata=md(), timeout=CALL_TIMEOUT).read())
    assert from_rpc_error(err).violations[0].field == "configuration_json"
    err = await rpc_error(stub.PinBlobs(storage_pb2.PinBlobsRequest(holder="", digests=[]), metadata=md()))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_gc_spares_recently_used_unreferenced_blobs(tmp_path, etcd, etcd_prefix, state, files):
    async with running_storage(tmp_path, etcd, etcd_prefix, gc_grace_s=300) as (app, stub):
        request = storage_pb2.PullBlobRequest(source_url=files["lora-a.gguf"][0])
        [m async for m in stub.PullBlob(request, metadata=md(), timeout=CALL_TIMEOUT)]
        digest = digest_of(files["lora-a.gguf"][1])
        gc = await stub.CollectGarbage(storage_pb2.CollectGarbageRequest(), metadata=md())
        # Pulled a moment ago by a caller that may be about to use it (the controller's PullBlob flow).
        assert gc.removed_digests == []
        path = app.store.blob_dir / digest[7:]
        os.utime(path, (path.stat().st_atime - 3600, path.stat().st_mtime - 3600))
        gc = await stub.CollectGarbage(storage_pb2.CollectGarbageRequest(), metadata=md())
        assert list(gc.removed_digests) == [digest]


async def test_pin_with_ttl_lapses_unless_renewed(storage, files, monkeypatch):
    app, stub = storage
    request = storage_pb2.PullBlobRequest(source_url=files["lora-a.gguf"][0])
    [m async for m in stub.PullBlob(request, metadata=md(), timeout=CALL_TIMEOUT)]
    digest = digest_of(files["lora-a.gguf"][1])
    await stub.PinBlobs(storage_pb2.PinBlobsRequest(holder="replica-7", digests=[digest], ttl_seconds=60),
                        metadata=md())
    assert (await stub.CollectGarbage(storage_pb2.CollectGarbageRequest(), metadata=md())).removed_digests == []
    import clowder_storage.space as space_module

    real = space_module._now
    # Two minutes on without a renewal: the runtime holding it is presumed gone.
    monkeypatch.setattr(space_module, "_now", lambda: real() + 120)
    gc = await stub.CollectGarbage(storage_pb2.CollectGarbageRequest(), metadata=md())
    assert list(gc.removed_digests) == [digest]
