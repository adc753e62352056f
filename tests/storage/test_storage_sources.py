"""hf://, s3:// and peer:// sources against real servers on loopback: a hub-like server, moto_server, a second node."""

from __future__ import annotations

import asyncio
import hashlib
import os
import pathlib
import subprocess
import sys

import grpc
import pytest
from aiohttp import web

from clowder.storage.v1 import storage_pb2
from clowder_common.errors import from_rpc_error
from clowder_common.processes import async_wait_for_port, free_port, terminate
from clowder_storage.hf import parse_hf
from helpers.storage import RangedSource, digest_of, md, pull, rpc_error, running_storage, serve_loopback, stored_names

HUB_TOKEN = "hf_test_token_0123456789"


class Hub:
    """Answers like the hub: HEAD/GET /ORG/REPO/resolve/REV/FILE -> 302 to a CDN with X-Linked-Etag/-Size."""

    def __init__(self, cdn: RangedSource) -> None:
        self.cdn = cdn
        # (repo, revision, file) -> (CDN name, sha256 hex to announce)
        self.files: dict[tuple[str, str, str], tuple[str, str]] = {}
        self.private: set[str] = set()
        self.port = 0
        self._runner: web.AppRunner | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _resolve(self, request: web.Request) -> web.Response:
        repo = f"{request.match_info['org']}/{request.match_info['repo']}"
        key = (repo, request.match_info["rev"], request.match_info["file"])
        if repo in self.private and request.headers.get("Authorization") != f"Bearer {HUB_TOKEN}":
            return web.Response(status=401, headers={"X-Error-Code": "GatedRepo"})
        if key not in self.files:
            return web.Response(status=404, headers={"X-Error-Code": "EntryNotFound"})
        name, sha = self.files[key]
        size = len(self.cdn.blobs[name])
        return web.Response(status=302, headers={
            "Location": self.cdn.url(name) + "?X-Amz-Signature=secret",
            "X-Linked-Etag": f'"{sha}"', "X-Linked-Size": str(size), "ETag": '"0123abcd"',
            "X-Repo-Commit": "a" * 40,
        })

    async def start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/{org}/{repo}/resolve/{rev}/{file:.+}", self._resolve)
        self._runner, self.port = await serve_loopback(app)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


@pytest.fixture
async def hub():
    cdn = RangedSource()
    await cdn.start()
    server = Hub(cdn)
    await server.start()
    yield server
    await server.stop()
    await cdn.stop()


@pytest.mark.unit
def test_hf_urls_parse_and_reject_escapes():
    assert parse_hf("hf:///org/repo/model.gguf") == ("org/repo", "main", "model.gguf")
    assert parse_hf("hf:///org/repo@v1.0/sub/model.gguf") == ("org/repo", "v1.0", "sub/model.gguf")
    for bad in ("hf:///org/repo", "hf:///org/../x.gguf", "hf:///org/repo/../../etc/passwd", "hf://host/o/r/f",
                "hf:///org/repo@../x/f"):
        with pytest.raises(Exception) as info:
            parse_hf(bad)
        assert info.value.violations[0].field == "source_url"


@pytest.mark.inprocess
async def test_hf_pull_verifies_against_the_hub_digest(tmp_path, etcd, etcd_prefix, state, hub):
    data = os.urandom(700_000)
    hub.cdn.blobs["lfs-1"] = data
    hub.files[("org/repo", "main", "model.gguf")] = ("lfs-1", hashlib.sha256(data).hexdigest())
    hub.files[("org/repo", "v2", "sub/model.gguf")] = ("lfs-1", hashlib.sha256(data).hexdigest())
    async with running_storage(tmp_path, etcd, etcd_prefix, hf_endpoint=hub.endpoint) as (app, stub):
        messages = await pull(stub, "hf:///org/repo/model.gguf")
        assert messages[-1].blob.digest == digest_of(data)
        # Known by the hub's digest: the second pull (another revision, same LFS object) moves no bytes.
        before = hub.cdn.bytes_sent
        again = await pull(stub, "hf:///org/repo@v2/sub/model.gguf")
        assert again[-1].blob.digest == digest_of(data) and hub.cdn.bytes_sent == before
        err = await rpc_error(pull(stub, "hf:///org/repo/missing.gguf"))
        assert err.code() == grpc.StatusCode.NOT_FOUND


@pytest.mark.inprocess
async def test_hf_wrong_bytes_from_the_cdn_are_data_loss(tmp_path, etcd, etcd_prefix, state, hub):
    data = os.urandom(300_000)
    hub.cdn.blobs["lfs-1"] = data
    hub.cdn.corrupt.add("lfs-1")
    hub.files[("org/repo", "main", "model.gguf")] = ("lfs-1", hashlib.sha256(data).hexdigest())
    async with running_storage(tmp_path, etcd, etcd_prefix, hf_endpoint=hub.endpoint) as (app, stub):
        err = await rpc_error(pull(stub, "hf:///org/repo/model.gguf"))
        assert err.code() == grpc.StatusCode.DATA_LOSS and "published" in err.details()
        assert stored_names(app) == []


@pytest.mark.inprocess
async def test_hf_token_goes_to_the_hub_not_to_the_cdn(tmp_path, etcd, etcd_prefix, state, hub):
    data = os.urandom(100_000)
    hub.cdn.blobs["lfs-1"] = data
    hub.private.add("org/gated")
    hub.files[("org/gated", "main", "model.gguf")] = ("lfs-1", hashlib.sha256(data).hexdigest())
    async with running_storage(tmp_path, etcd, etcd_prefix, hf_endpoint=hub.endpoint) as (app, stub):
        err = await rpc_error(pull(stub, "hf:///org/gated/model.gguf"))
        assert err.code() == grpc.StatusCode.PERMISSION_DENIED
        ok = await pull(stub, "hf:///org/gated/model.gguf",
                        credentials=storage_pb2.Credentials(bearer_token=HUB_TOKEN))
        assert ok[-1].blob.digest == digest_of(data)
        assert all(HUB_TOKEN not in seen for seen in hub.cdn.auth_seen)


@pytest.fixture(scope="module")
def moto():
    port = free_port()
    binary = pathlib.Path(sys.executable).with_name("moto_server")
    proc = subprocess.Popen([str(binary), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    yield proc, f"http://127.0.0.1:{port}"
    terminate(proc, 5)


@pytest.mark.processes
async def test_s3_pull_with_credentials_and_errors(tmp_path, etcd, etcd_prefix, state, moto):
    import boto3

    proc, endpoint = moto
    await async_wait_for_port("127.0.0.1", int(endpoint.rsplit(":", 1)[1]), 30)
    assert proc.poll() is None, "moto_server exited"
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                          aws_access_key_id="AKIDTEST", aws_secret_access_key="s3-secret-test")
    data = os.urandom(2_500_000)
    await asyncio.to_thread(client.create_bucket, Bucket="models")
    await asyncio.to_thread(client.put_object, Bucket="models", Key="org/model.gguf", Body=data)
    creds = storage_pb2.Credentials(username="AKIDTEST", password="s3-secret-test")
    async with running_storage(tmp_path, etcd, etcd_prefix, s3_endpoint=endpoint, parallel_min_bytes=1_000_000,
                               parallel_part_min_bytes=1 << 20) as (app, stub):
        messages = await pull(stub, "s3://models/org/model.gguf", expected=digest_of(data), credentials=creds)
        assert messages[-1].blob.digest == digest_of(data)
        assert (app.store.blob_dir / digest_of(data)[7:]).read_bytes() == data
        err = await rpc_error(pull(stub, "s3://models/org/absent.gguf", credentials=creds))
        assert err.code() == grpc.StatusCode.NOT_FOUND
        err = await rpc_error(pull(stub, "s3://Bad_Bucket/x", credentials=creds))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.inprocess
async def test_peer_pull_streams_from_another_nodes_store(tmp_path, etcd, etcd_prefix, state):
    data = os.urandom(1_500_000)
    source = tmp_path / "model.gguf"
    source.write_bytes(data)
    async with running_storage(tmp_path, etcd, etcd_prefix, name="node-a") as (a, stub_a):
        await pull(stub_a, f"file://{source}")
        source.unlink()  # from now on only node-a has it
        async with running_storage(tmp_path, etcd, etcd_prefix, name="node-b") as (b, stub_b):
            url = f"peer://127.0.0.1:{a.port}/{digest_of(data)}"
            messages = await pull(stub_b, url)
            assert messages[-1].blob.digest == digest_of(data)
            assert (b.store.blob_dir / digest_of(data)[7:]).read_bytes() == data
            missing = "sha256:" + "0" * 64
            err = await rpc_error(pull(stub_b, f"peer://127.0.0.1:{a.port}/{missing}"))
            assert err.code() == grpc.StatusCode.NOT_FOUND
            err = await rpc_error(pull(stub_b, f"peer://127.0.0.1:{a.port}/../etc/passwd"))
            assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
            # Resumable by offset: the tail of the blob alone.
            chunks = [m async for m in stub_a.ReadBlob(storage_pb2.ReadBlobRequest(
                digest=digest_of(data), offset=1_000_000), metadata=md())]
            assert b"".join(c.data for c in chunks) == data[1_000_000:]
            assert from_rpc_error(err).violations[0].field == "source_url"


@pytest.mark.inprocess
async def test_file_roots_confine_file_sources(tmp_path, etcd, etcd_prefix):
    served = tmp_path / "models"
    served.mkdir()
    inside = served / "m.gguf"
    inside.write_bytes(b"inside" * 1000)
    outside = tmp_path / "secret.txt"
    outside.write_bytes(b"not for the store")
    (served / "escape.gguf").symlink_to(outside)
    async with running_storage(tmp_path, etcd, etcd_prefix, file_roots=(str(served),)) as (app, stub):
        done = await pull(stub, inside.as_uri())
        assert done[-1].blob.digest == digest_of(inside.read_bytes())
        for url in (outside.as_uri(), (served / "escape.gguf").as_uri(), f"file://{served}/../secret.txt"):
            err = await rpc_error(pull(stub, url))
            assert err.code() == grpc.StatusCode.PERMISSION_DENIED, url
            assert from_rpc_error(err).reason == "SOURCE_OUTSIDE_FILE_ROOTS"
        # Nothing of the refused files reached the store.
        assert stored_names(app) == [digest_of(inside.read_bytes()).split(":")[1]]
