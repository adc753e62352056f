"""A pull interrupted by a storage restart resumes from what was verified: real processes, sockets, SIGKILL."""

# A real `python -m clowder_storage` process pulls a large blob from a slow, byte-counting HTTP server; it is
# SIGKILLed mid-pull, a new process starts on the same data directory, and the second pull asks the server only
# for about the remainder. A kept prefix that was altered on disk is caught by the final digest and the pull
# starts over. Sidecars that are torn, and partials nobody comes back for, are dropped.

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import os
import signal
import subprocess
import time

import grpc
import pytest

from clowder.storage.v1 import storage_pb2_grpc
from clowder_common.auth import TOKEN_ENV
from clowder_common.clients import aio_channel
from clowder_common.processes import async_wait_for_port, free_port
from clowder_storage import resume
from clowder_storage.store import BlobStore
from helpers.storage import TOKEN, RangedSource, digest_of, pull
from test_storage_process import env_without_token, storage_argv, wait_serving

MIB = 1 << 20
SIZE = 32 * MIB
# 32 MiB at 50 ms per MiB: about 1.6 s per full pull, long enough to kill the puller mid-way on a busy host.
PACE_S = 0.05
# The kill comes once the sidecar vouches for at least this much.
KILL_AFTER = 12 * MIB


class StorageProcess:
    def __init__(self, tmp_path, etcd, prefix: str, extra: tuple[str, ...] = ()) -> None:
        self.port = free_port()
        self.log_path = tmp_path / f"storage-{self.port}.log"
        with open(self.log_path, "wb") as log_file:
            self.proc = subprocess.Popen([*storage_argv(self.port, tmp_path, etcd, prefix), *extra], stdout=log_file,
                                         stderr=subprocess.STDOUT, env={**env_without_token(), TOKEN_ENV: TOKEN})

    async def ready(self) -> None:
        await async_wait_for_port("127.0.0.1", self.port, timeout=30)
        await wait_serving(self.port, timeout=15)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def log(self) -> str:
        return self.log_path.read_text()


def sidecar_durable(path) -> int:
    try:
        return json.loads(path.read_text())["durable"]
    except (OSError, ValueError, KeyError):
        return 0


async def pull_and_kill(tmp_path, etcd, prefix, source: RangedSource, name: str, digest: str,
                        extra: tuple[str, ...] = ()) -> int:
    """Start a pull in a storage process, SIGKILL it once KILL_AFTER bytes are vouched for: the kept prefix."""
    sidecar = tmp_path / "store" / "partial" / f"{digest.split(':')[1]}.json"
    first = StorageProcess(tmp_path, etcd, prefix, extra)
    try:
        await first.ready()
        async with aio_channel(f"127.0.0.1:{first.port}") as channel:
            pulling = asyncio.create_task(pull(storage_pb2_grpc.StorageServiceStub(channel), source.url(name),
                                               digest))
            deadline = time.monotonic() + 60
            while sidecar_durable(sidecar) < KILL_AFTER:
                assert not pulling.done(), "the pull ended before it could be interrupted"
                assert time.monotonic() < deadline, "the pull made no durable progress in 60 s"
                await asyncio.sleep(0.02)
            first.proc.send_signal(signal.SIGKILL)
            await asyncio.to_thread(first.proc.wait, 10)
            with pytest.raises(grpc.aio.AioRpcError):
                await asyncio.wait_for(pulling, 30)
    finally:
        first.stop()
    kept = sidecar_durable(sidecar)
    assert KILL_AFTER <= kept < SIZE
    assert (tmp_path / "store" / "partial" / f"{digest.split(':')[1]}.data").stat().st_size >= kept
    return kept


async def pull_in_new_process(tmp_path, etcd, prefix, source, name, digest,
                              extra: tuple[str, ...] = ()) -> tuple[StorageProcess, list]:
    second = StorageProcess(tmp_path, etcd, prefix, extra)
    try:
        await second.ready()
        async with aio_channel(f"127.0.0.1:{second.port}") as channel:
            messages = await pull(storage_pb2_grpc.StorageServiceStub(channel), source.url(name), digest)
    finally:
        second.proc.send_signal(signal.SIGTERM)
        await asyncio.to_thread(second.proc.wait, 20)
        second.stop()
    return second, messages


def stored_digest(tmp_path, digest: str) -> str:
    path = tmp_path / "store" / "blobs" / "sha256" / digest.split(":")[1]
    return digest_of(path.read_bytes())


def offer_big(source: RangedSource, pace_s: float = PACE_S) -> str:
    """SIZE random bytes served by `source` as "big", paced; their digest."""
    data = os.urandom(SIZE)
    source.blobs["big"] = data
    source.pace_s["big"] = pace_s
    return digest_of(data)


@pytest.mark.processes
async def test_sigkilled_pull_resumes_from_the_kept_prefix_in_a_new_process(tmp_path, etcd, etcd_prefix, source):
    digest = offer_big(source)

    kept = await pull_and_kill(tmp_path, etcd, etcd_prefix, source, "big", digest)
    served_first = source.served["big"]
    requests_before = len(source.requests)

    second, messages = await pull_in_new_process(tmp_path, etcd, etcd_prefix, source, "big", digest)
    served_second = source.served["big"] - served_first

    assert messages[-1].blob.digest == digest
    assert stored_digest(tmp_path, digest) == digest
    # Only the remainder went over the wire again, asked for as a range from the kept prefix.
    assert served_second == SIZE - kept
    assert source.requests[requests_before:] == [("big", f"bytes={kept}-")]
    assert served_first + served_second < 1.6 * SIZE
    assert f"resuming the pull of {digest} from byte {kept}" in second.log()
    # Nothing partial is left, and nothing partial was ever in the blob directory.
    assert os.listdir(tmp_path / "store" / "partial") == []
    assert os.listdir(tmp_path / "store" / "blobs" / "sha256") == [digest.split(":")[1]]


@pytest.mark.processes
async def test_sigkilled_parallel_pull_resumes_from_its_contiguous_prefix(tmp_path, etcd, etcd_prefix, source):
    # Pieces over 4 connections: what survives a kill is the contiguous hashed prefix; pieces finished past
    # it are fetched again (the sidecar vouches for one length, not a map of pieces).
    config = tmp_path / "storage.yaml"
    config.write_text(f"parallel_min_bytes: {8 * MIB}\nparallel_parts: 4\nparallel_part_min_bytes: {MIB}\n"
                      f"parallel_part_max_bytes: {4 * MIB}\n")
    extra = ("--config", str(config))
    # Four connections at once: slower each, so the whole still takes over a second.
    digest = offer_big(source, pace_s=PACE_S * 4)

    kept = await pull_and_kill(tmp_path, etcd, etcd_prefix, source, "big", digest, extra)
    first_log = "".join(p.read_text() for p in tmp_path.glob("storage-*.log"))
    assert "as 8 pieces over 4 connections" in first_log
    served_first = source.served["big"]
    requests_before = len(source.requests)

    second, messages = await pull_in_new_process(tmp_path, etcd, etcd_prefix, source, "big", digest, extra)
    served_second = source.served["big"] - served_first

    assert messages[-1].blob.digest == digest
    assert stored_digest(tmp_path, digest) == digest
    # The remainder after the prefix, in one ranged request (a resumed pull does not split again).
    assert served_second == SIZE - kept
    assert source.requests[requests_before:] == [("big", f"bytes={kept}-")]
    assert os.listdir(tmp_path / "store" / "partial") == []


@pytest.mark.processes
async def test_altered_kept_prefix_is_caught_and_the_pull_starts_over(tmp_path, etcd, etcd_prefix, source):
    digest = offer_big(source)

    kept = await pull_and_kill(tmp_path, etcd, etcd_prefix, source, "big", digest)
    # Flip bytes inside the prefix the sidecar vouches for: only the whole digest can tell.
    data_path = tmp_path / "store" / "partial" / f"{digest.split(':')[1]}.data"
    with open(data_path, "r+b") as handle:
        handle.seek(kept // 2)
        original = handle.read(16)
        handle.seek(kept // 2)
        handle.write(bytes(b ^ 0xFF for b in original))
    served_first = source.served["big"]

    second, messages = await pull_in_new_process(tmp_path, etcd, etcd_prefix, source, "big", digest)
    served_second = source.served["big"] - served_first

    assert messages[-1].blob.digest == digest
    assert stored_digest(tmp_path, digest) == digest
    # The remainder, then the whole blob once more from zero.
    assert served_second == (SIZE - kept) + SIZE
    assert "discarding the kept prefix and starting over" in second.log()
    assert os.listdir(tmp_path / "store" / "partial") == []


def make_store(tmp_path) -> tuple[BlobStore, concurrent.futures.ThreadPoolExecutor]:
    executor = concurrent.futures.ThreadPoolExecutor(2)
    store = BlobStore(tmp_path / "store", executor)
    store.prepare_sync()
    return store, executor


def kept_partial(store: BlobStore, data: bytes) -> str:
    """Write `data` as a kept partial of its digest, checkpointed as a killed pull would have left it."""
    digest = digest_of(data)
    temp = store.resumable_temp_sync(digest, "http://127.0.0.1:1/f/x")
    temp.write(data)
    temp.keep()
    return digest


@pytest.mark.unit
def test_kept_prefix_is_rehashed_and_a_torn_sidecar_or_tail_is_not_trusted(tmp_path):
    store, executor = make_store(tmp_path)
    try:
        data = os.urandom(3 * MIB)
        digest = kept_partial(store, data)
        temp = store.resumable_temp_sync(digest, "http://127.0.0.1:1/f/x")
        assert temp.partial.resumed_from == temp.size == temp.hashed == len(data)
        assert temp.digest == digest
        # Bytes past the vouched length (a torn tail) are cut off, not trusted.
        temp.write(b"garbage past the checkpoint")
        os.close(temp.detach())
        temp.partial.keep()
        temp = store.resumable_temp_sync(digest, "http://127.0.0.1:1/f/x")
        assert temp.size == len(data) and temp.digest == digest
        temp.keep()
        # A torn sidecar: the partial is dropped and the pull starts from zero.
        sidecar = temp.partial.sidecar_path
        sidecar.write_text(sidecar.read_text()[:-10])
        temp = store.resumable_temp_sync(digest, "http://127.0.0.1:1/f/x")
        assert temp.size == 0 and temp.partial.resumed_from == 0
        temp.discard()
        assert os.listdir(store.partials.dir) == []
        # A partial held by one pull is not handed to a second at the same time.
        held = store.resumable_temp_sync(digest, "http://127.0.0.1:1/f/x")
        other = store.resumable_temp_sync(digest, "http://127.0.0.1:1/f/x")
        assert other.partial is None and other.path.parent == store.tmp_dir
        other.discard()
        held.discard()
    finally:
        executor.shutdown()


@pytest.mark.unit
def test_unclaimed_partials_are_collected_by_age_and_total_size(tmp_path, monkeypatch):
    store, executor = make_store(tmp_path)
    try:
        old = kept_partial(store, os.urandom(MIB))
        stale = time.time() - resume.DEFAULT_MAX_AGE_S - 60
        os.utime(store.partials.dir / f"{old.split(':')[1]}.json", (stale, stale))
        first = kept_partial(store, os.urandom(2 * MIB))
        second = kept_partial(store, os.urandom(2 * MIB))
        earlier = time.time() - 60
        os.utime(store.partials.dir / f"{first.split(':')[1]}.json", (earlier, earlier))
        (store.partials.dir / "orphan.data").write_bytes(b"x")
        store.partials.max_bytes = 3 * MIB
        # A restart collects: the stale one, the orphan, then the oldest until under the cap.
        store.prepare_sync()
        names = sorted(os.listdir(store.partials.dir))
        assert names == sorted(f"{second.split(':')[1]}.{ext}" for ext in ("data", "json"))
    finally:
        executor.shutdown()
