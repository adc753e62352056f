"""A ranged HTTP source that can misbehave and a storage service in this process: the storage tests' own, and the
batch and supervisor tests' too."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import pathlib
import re
import secrets

import grpc
from aiohttp import web

from clowder.storage.v1 import storage_pb2, storage_pb2_grpc
from clowder_common.auth import bearer_metadata
from clowder_common.clients import aio_channel
from clowder_storage.app import create_storage
from helpers.configs import storage_config

TOKEN = secrets.token_urlsafe(24)
CALL_TIMEOUT = 30
RANGE_RE = re.compile(r"bytes=(\d+)-(\d*)")


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


async def serve_loopback(app: web.Application) -> tuple[web.AppRunner, int]:
    """Start `app` on 127.0.0.1 at a free port: its runner (to clean up) and the port."""
    runner = web.AppRunner(app, shutdown_timeout=1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, site._server.sockets[0].getsockname()[1]


class RangedSource:
    """A real HTTP server on 127.0.0.1 that honours Range and If-Range, and injects faults on request.

    /f/<name>: the blob. Faults, set per name: `drop_after[name] = n` closes the connection after n bytes of a
    response (once per entry in the list), `corrupt[name]` serves altered bytes, `token` requires a bearer.
    """

    def __init__(self) -> None:
        self.blobs: dict[str, bytes] = {}
        self.drops: dict[str, list[int]] = collections.defaultdict(list)
        self.corrupt: set[str] = set()
        self.token = ""
        self.basic = ""
        self.ranges = True
        self.requests: list[tuple[str, str]] = []
        # Client (host, port) of each request: how many connections a pull used.
        self.peers: list[tuple[str, int]] = []
        self.auth_seen: list[str] = []
        self.bytes_sent = 0
        # name -> gate: a response sends its first MiB, then waits for the gate.
        self.holds: dict[str, asyncio.Event] = {}
        # name -> gate: a response sends its first MiB, waits for the gate, then drops the connection (once).
        self.abort_gates: dict[str, asyncio.Event] = {}
        # name -> seconds to wait after each MiB: slow enough to kill a puller mid-way.
        self.pace_s: dict[str, float] = {}
        # name -> body bytes written so far, counted as they go (a cut-off response counts what it sent).
        self.served: dict[str, int] = collections.defaultdict(int)
        self.port = 0
        self._runner: web.AppRunner | None = None

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.port}/f/{name}"

    async def _serve(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        self.requests.append((name, request.headers.get("Range", "")))
        self.peers.append(request.transport.get_extra_info("peername")[:2])
        self.auth_seen.append(request.headers.get("Authorization", ""))
        if self.token and request.headers.get("Authorization") != f"Bearer {self.token}":
            raise web.HTTPUnauthorized()
        if self.basic and request.headers.get("Authorization") != f"Basic {self.basic}":
            raise web.HTTPUnauthorized()
        if name not in self.blobs:
            raise web.HTTPNotFound()
        data = self.blobs[name]
        if name in self.corrupt:
            data = bytes([data[0] ^ 0xFF]) + data[1:]
        etag = '"' + hashlib.sha256(data).hexdigest()[:16] + '"'
        headers = {"ETag": etag}
        if self.ranges:
            headers["Accept-Ranges"] = "bytes"
        start, stop, status = 0, len(data), 200
        match = RANGE_RE.fullmatch(request.headers.get("Range", ""))
        if self.ranges and match and request.headers.get("If-Range", etag) == etag:
            start = int(match.group(1))
            stop = int(match.group(2)) + 1 if match.group(2) else len(data)
            status = 206
            headers["Content-Range"] = f"bytes {start}-{stop - 1}/{len(data)}"
        body = data[start:stop]
        headers["Content-Length"] = str(len(body))
        response = web.StreamResponse(status=status, headers=headers)
        await response.prepare(request)
        cut = self.drops[name].pop(0) if self.drops[name] else None
        gate = self.abort_gates.pop(name, None)
        if gate is not None:
            await response.write(body[: 1 << 20])
            await asyncio.wait_for(gate.wait(), CALL_TIMEOUT)
            self.bytes_sent += 1 << 20
            assert request.transport is not None
            request.transport.abort()
            return response
        if cut is not None:
            await response.write(body[:cut])
            self.bytes_sent += cut
            # Drop the TCP connection mid-body: the client sees a broken transfer, not a clean end.
            assert request.transport is not None
            request.transport.abort()
            return response
        for i in range(0, len(body), 1 << 20):
            piece = body[i:i + (1 << 20)]
            await response.write(piece)
            self.served[name] += len(piece)
            if name in self.pace_s:
                await asyncio.sleep(self.pace_s[name])
            if name in self.holds:
                await asyncio.wait_for(self.holds[name].wait(), CALL_TIMEOUT)
        self.bytes_sent += len(body)
        await response.write_eof()
        return response

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/f/{name}", self._serve)
        self._runner, self.port = await serve_loopback(app)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


@contextlib.asynccontextmanager
async def running_storage(tmp_path: pathlib.Path, etcd, prefix: str, name: str = "node-a", **overrides):
    config = storage_config(etcd.endpoint, prefix, tmp_path / name, name, lease_ttl_s=5, **overrides)
    app = await create_storage(config, TOKEN)
    await app.start()
    channel = aio_channel(f"127.0.0.1:{app.port}")
    try:
        yield app, storage_pb2_grpc.StorageServiceStub(channel)
    finally:
        await channel.close()
        await app.stop()


async def pull(stub, url: str, expected: str = "", credentials: storage_pb2.Credentials | None = None):
    messages = []
    request = storage_pb2.PullBlobRequest(source_url=url, expected_digest=expected, credentials=credentials)
    async for message in stub.PullBlob(request, metadata=bearer_metadata(TOKEN), timeout=CALL_TIMEOUT):
        messages.append(message)
    return messages


async def rpc_error(awaitable) -> grpc.aio.AioRpcError:
    try:
        await awaitable
    except grpc.aio.AioRpcError as err:
        return err
    raise AssertionError("the call succeeded")


def stored_names(app) -> list[str]:
    return sorted(p.name for p in app.store.blob_dir.iterdir())


def tmp_files(app) -> list[str]:
    return sorted(p.name for p in app.store.tmp_dir.iterdir())


def md() -> tuple:
    return bearer_metadata(TOKEN)
