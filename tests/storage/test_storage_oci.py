"""Push an aimage to Debian's docker-registry (behind a token-auth front) and pull it back on another node."""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess

import aiohttp
import grpc
import pytest
from aiohttp import web

from clowder.storage.v1 import storage_pb2
from clowder_common.processes import async_wait_for_port, free_port, terminate
from clowder_storage.oci import parse_oci
from helpers.storage import CALL_TIMEOUT, digest_of, md, rpc_error, running_storage, serve_loopback

USER, PASSWORD, TOKEN = "robot", "registry-pass-42", "registry-token-xyz"


class TokenFront:
    """The registry's auth as Docker Hub does it: 401 + Bearer challenge, a realm that swaps Basic for a token."""

    def __init__(self, registry: str) -> None:
        self.registry = registry
        self.port = 0
        self.log: list[tuple[str, str]] = []
        self.token_requests = 0
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None

    async def _token(self, request: web.Request) -> web.Response:
        self.token_requests += 1
        expected = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
        if request.headers.get("Authorization") != expected:
            return web.Response(status=401)
        return web.json_response({"token": TOKEN, "expires_in": 300})

    async def _proxy(self, request: web.Request) -> web.Response:
        self.log.append((request.method, request.path))
        if request.headers.get("Authorization") != f"Bearer {TOKEN}":
            realm = f"http://127.0.0.1:{self.port}/token"
            return web.Response(status=401, headers={
                "WWW-Authenticate": f'Bearer realm="{realm}",service="test",scope="repository:clowder:pull,push"'})
        headers = {k: v for k, v in request.headers.items()
                   if k.lower() not in ("authorization", "transfer-encoding", "content-length")}
        assert self._session is not None
        async with self._session.request(request.method, f"http://{self.registry}{request.path_qs}",
                                         headers=headers, data=await request.read(),
                                         allow_redirects=False) as upstream:
            body = await upstream.read()
            out = {k: v for k, v in upstream.headers.items()
                   if k.lower() not in ("transfer-encoding", "content-length", "content-encoding", "connection")}
            if request.method == "HEAD":
                return web.Response(status=upstream.status, headers=out)
            return web.Response(status=upstream.status, headers=out, body=body)

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(auto_decompress=False)
        app = web.Application(client_max_size=64 << 20)
        app.router.add_get("/token", self._token)
        app.router.add_route("*", "/v2/{tail:.*}", self._proxy)
        self._runner, self.port = await serve_loopback(app)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        if self._session is not None:
            await self._session.close()


@pytest.fixture
async def registry(tmp_path):
    port = free_port()
    config = tmp_path / "registry.yml"
    # JSON is YAML; the registry's own format keeps the test free of a YAML writer.
    config.write_text(json.dumps({
        "version": 0.1,
        "storage": {"filesystem": {"rootdirectory": str(tmp_path / "registry")}},
        "http": {"addr": f"127.0.0.1:{port}"},
        "log": {"level": "error"},
    }))
    proc = subprocess.Popen([shutil.which("docker-registry") or "docker-registry", "serve", str(config)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        await async_wait_for_port("127.0.0.1", port, 30)
        front = TokenFront(f"127.0.0.1:{port}")
        await front.start()
        yield front
        await front.stop()
    finally:
        terminate(proc, 5)


@pytest.mark.unit
def test_oci_references_parse_and_reject_escapes():
    assert parse_oci("oci://reg:5000/org/model:v1").reference == "v1"
    assert parse_oci("oci://reg/org/model").reference == "latest"
    digest = "sha256:" + "a" * 64
    assert parse_oci(f"oci://reg/org/model@{digest}").is_digest
    for bad in ("oci://reg/../x:v1", "oci://reg/Org/model:v1", "oci:///model:v1", "oci://reg/m:bad/tag",
                "oci://reg/m@sha256:zz"):
        with pytest.raises(Exception) as info:
            parse_oci(bad)
        assert info.value.violations


@pytest.mark.processes
async def test_push_then_pull_back_byte_identical_with_token_auth(tmp_path, etcd, etcd_prefix, state, registry):
    files = tmp_path / "files"
    files.mkdir()
    model, adapter = os.urandom(1_500_000), os.urandom(50_000)
    (files / "model.gguf").write_bytes(model)
    (files / "lora.gguf").write_bytes(adapter)
    target = f"oci://127.0.0.1:{registry.port}/clowder/smol:v1"
    creds = storage_pb2.Credentials(username=USER, password=PASSWORD)
    async with running_storage(tmp_path, etcd, etcd_prefix, name="node-a") as (a, stub_a):
        request = storage_pb2.PullImageRequest(name="smol", configuration_json='{"system_prompt": "hi"}', layers=[
            storage_pb2.LayerSource(kind=storage_pb2.LAYER_KIND_MODEL, source_url=f"file://{files / 'model.gguf'}"),
            storage_pb2.LayerSource(kind=storage_pb2.LAYER_KIND_ADAPTER, source_url=f"file://{files / 'lora.gguf'}"),
        ])
        original = [m async for m in stub_a.PullImage(request, metadata=md(), timeout=CALL_TIMEOUT)][-1].image
        err = await rpc_error(stub_a.PushImage(storage_pb2.PushImageRequest(name="smol", target_url=target),
                                               metadata=md(), timeout=CALL_TIMEOUT).read())
        assert err.code() == grpc.StatusCode.PERMISSION_DENIED
        pushed = [m async for m in stub_a.PushImage(
            storage_pb2.PushImageRequest(name="smol", target_url=target, credentials=creds),
            metadata=md(), timeout=CALL_TIMEOUT)]
        assert pushed[-1].manifest_digest == original.manifest_digest
        assert {m.layer.index for m in pushed[:-1]} == {-1, 0, 1}
        puts = [p for m, p in registry.log if m == "PUT"]
        # A second push finds every blob in place and sends only the manifest.
        [m async for m in stub_a.PushImage(storage_pb2.PushImageRequest(name="smol", target_url=target,
                                                                        credentials=creds), metadata=md())]
        assert len([p for m, p in registry.log if m == "PUT"]) == len(puts) + 1
        manifest_a = (a.store.blob_dir / original.manifest_digest[7:]).read_bytes()

    async with running_storage(tmp_path, etcd, etcd_prefix, name="node-b") as (b, stub_b):
        for name, url in (("copy", target),
                          ("pinned", f"oci://127.0.0.1:{registry.port}/clowder/smol@{original.manifest_digest}")):
            messages = [m async for m in stub_b.PullImage(
                storage_pb2.PullImageRequest(name=name, source_url=url, credentials=creds),
                metadata=md(), timeout=CALL_TIMEOUT)]
            image = messages[-1].image
            assert image.manifest_digest == original.manifest_digest and image.complete
        assert (b.store.blob_dir / original.manifest_digest[7:]).read_bytes() == manifest_a
        resolved = (await stub_b.ResolveImage(storage_pb2.ResolveImageRequest(name="copy"), metadata=md())).image
        assert [open(layer.path, "rb").read() for layer in resolved.layers] == [model, adapter]
        assert json.loads(resolved.configuration_json) == {"system_prompt": "hi"}
        assert [layer.digest for layer in resolved.layers] == [digest_of(model), digest_of(adapter)]
        missing = f"oci://127.0.0.1:{registry.port}/clowder/absent:v1"
        err = await rpc_error(stub_b.PullImage(storage_pb2.PullImageRequest(
            name="x", source_url=missing, credentials=creds), metadata=md(), timeout=CALL_TIMEOUT).read())
        assert err.code() == grpc.StatusCode.NOT_FOUND
    assert registry.token_requests >= 1
