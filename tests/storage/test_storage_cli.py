"""`clowder storage ls|gc|verify` as a real process against a running storage service."""

from __future__ import annotations

import asyncio
import os
import sys

import pytest

from clowder.storage.v1 import storage_pb2
from clowder_common.auth import TOKEN_ENV
from helpers.storage import CALL_TIMEOUT, TOKEN, digest_of, md, pull, running_storage, stored_names

pytestmark = pytest.mark.processes


async def clowder(tmp_path, port: int, *argv: str) -> tuple[int, str]:
    env = {**os.environ, TOKEN_ENV: TOKEN, "COLUMNS": "200"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "clowder_cli.main", "--data-dir", str(tmp_path / "cli"), "storage",
        "--storage", f"127.0.0.1:{port}", *argv,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, env=env)
    out, _ = await asyncio.wait_for(proc.communicate(), CALL_TIMEOUT)
    return proc.returncode, out.decode()


async def test_storage_ls_gc_verify(tmp_path, etcd, etcd_prefix, state):
    model, stray = os.urandom(200_000), os.urandom(100_000)
    (tmp_path / "model.gguf").write_bytes(model)
    (tmp_path / "stray.bin").write_bytes(stray)
    async with running_storage(tmp_path, etcd, etcd_prefix, gc_grace_s=0) as (app, stub):
        request = storage_pb2.PullImageRequest(name="smol", layers=[storage_pb2.LayerSource(
            kind=storage_pb2.LAYER_KIND_MODEL, source_url=f"file://{tmp_path / 'model.gguf'}")])
        [m async for m in stub.PullImage(request, metadata=md(), timeout=CALL_TIMEOUT)]
        await pull(stub, f"file://{tmp_path / 'stray.bin'}")

        code, out = await clowder(tmp_path, app.port, "ls")
        assert code == 0, out
        assert "smol" in out and digest_of(stray) in out and "4 blob(s)" in out

        code, out = await clowder(tmp_path, app.port, "gc", "--dry-run")
        assert code == 0 and digest_of(stray) in out and "would remove 1 blob(s)" in out
        assert digest_of(stray)[7:] in stored_names(app)
        code, out = await clowder(tmp_path, app.port, "gc")
        assert code == 0 and "removed 1 blob(s)" in out
        assert digest_of(stray)[7:] not in stored_names(app)

        code, out = await clowder(tmp_path, app.port, "verify")
        assert code == 0 and "checked 3 blob(s), 0 bad" in out
        with open(app.store.blob_dir / digest_of(model)[7:], "r+b") as handle:
            handle.write(b"rot")
        code, out = await clowder(tmp_path, app.port, "verify")
        assert code == 1 and f"quarantined {digest_of(model)}" in out
