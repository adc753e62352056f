"""Blobs flushed in the background: journaled before they appear, re-hashed after a crash, torn ones quarantined."""

from __future__ import annotations

import concurrent.futures
import hashlib
import os
import pathlib
import signal
import subprocess
import sys

import pytest

from clowder_storage.durability import JOURNAL_NAME
from clowder_storage.store import BlobStore
from helpers.storage import digest_of, pull, running_storage, stored_names

# The process stores one blob with background flushing and is killed (SIGKILL) the moment the blob has been
# renamed into place, before its bytes are flushed: the state a power cut can leave, short of the torn bytes.
CRASH_AFTER_RENAME = """
import asyncio, concurrent.futures, os, signal, sys
from clowder_storage.store import BlobStore

async def main(root, source):
    store = BlobStore(root, concurrent.futures.ThreadPoolExecutor(2), background_flush_min_bytes=1 << 20)
    await store.prepare()
    store.flusher.submit = lambda fd, hex_digest: os.kill(os.getpid(), signal.SIGKILL)
    temp = await store.new_temp()
    with open(source, "rb") as handle:
        await store.write(temp, handle.read())
    await store.commit(temp)

asyncio.run(main(sys.argv[1], sys.argv[2]))
"""


def crash_after_rename(root: pathlib.Path, source: pathlib.Path) -> None:
    proc = subprocess.run([sys.executable, "-c", CRASH_AFTER_RENAME, str(root), str(source)],
                          capture_output=True, timeout=60)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()


def journal_lines(root: pathlib.Path) -> list[str]:
    return (root / JOURNAL_NAME).read_text().split()


@pytest.fixture
def executor():
    pool = concurrent.futures.ThreadPoolExecutor(2)
    yield pool
    pool.shutdown(wait=True)


async def store_bytes(store: BlobStore, data: bytes):
    temp = await store.new_temp()
    await store.write(temp, data)
    return await store.commit(temp)


@pytest.mark.unit
async def test_large_blob_is_readable_at_once_and_its_journal_entry_goes_once_flushed(tmp_path, executor):
    store = BlobStore(tmp_path / "s", executor, background_flush_min_bytes=1 << 20)
    await store.prepare()
    data = os.urandom(3 << 20)
    info = await store_bytes(store, data)
    # Complete and verified the moment the commit returns, flushed or not.
    assert (store.blob_dir / info.digest[7:]).read_bytes() == data
    assert await store.flushed(30)
    assert store.journal.pending() == [] and journal_lines(store.root) == []
    await store.close()


@pytest.mark.unit
async def test_small_blob_is_flushed_before_it_appears_without_the_journal(tmp_path, executor):
    store = BlobStore(tmp_path / "s", executor, background_flush_min_bytes=1 << 20)
    await store.prepare()
    journal = store.root / JOURNAL_NAME
    before = journal.stat().st_mtime_ns
    info = await store_bytes(store, b"a manifest" * 100)
    assert store.journal.pending() == []
    assert journal.stat().st_mtime_ns == before, "a small blob must not go through the journal"
    assert info.size_bytes == 1000
    await store.close()


@pytest.mark.unit
async def test_blob_deleted_before_its_flush_leaves_nothing_pending(tmp_path, executor):
    store = BlobStore(tmp_path / "s", executor, background_flush_min_bytes=1 << 20)
    await store.prepare()
    data = os.urandom(2 << 20)
    info = await store_bytes(store, data)
    await store.delete(info.digest)
    # The same content stored again, maybe while the first copy's flush is pending, is flushed on its own.
    again = await store_bytes(store, data)
    assert again.digest == info.digest
    assert await store.flushed(30)
    assert journal_lines(store.root) == [] and store.journal.pending() == []
    assert (store.blob_dir / info.digest[7:]).read_bytes() == data
    await store.close()


@pytest.mark.processes
async def test_crash_before_flush_journals_the_blob_and_startup_keeps_it_when_intact(tmp_path, executor):
    root = tmp_path / "s"
    source = tmp_path / "layer.bin"
    data = os.urandom(3 << 20)
    source.write_bytes(data)
    crash_after_rename(root, source)
    hex_digest = hashlib.sha256(data).hexdigest()
    # The entry reached the journal before the name appeared.
    assert (root / "blobs" / "sha256" / hex_digest).exists()
    assert journal_lines(root) == [hex_digest]
    store = BlobStore(root, executor)
    await store.prepare()
    assert store.recovered.checked == 1 and store.recovered.quarantined == []
    assert [b.digest for b in await store.list()] == [f"sha256:{hex_digest}"]
    assert journal_lines(root) == [] and list(store.quarantine_dir.iterdir()) == []


@pytest.mark.processes  # a child process writes and crashes
async def test_torn_journaled_blob_is_quarantined_at_startup_and_the_store_stays_usable(tmp_path, etcd, etcd_prefix,
                                                                                    state):
    root = tmp_path / "node-a"
    torn_source, whole_source = tmp_path / "torn.bin", tmp_path / "whole.bin"
    torn, whole = os.urandom(3 << 20), os.urandom(2 << 20)
    torn_source.write_bytes(torn)
    whole_source.write_bytes(whole)
    torn_hex, whole_hex = hashlib.sha256(torn).hexdigest(), hashlib.sha256(whole).hexdigest()
    crash_after_rename(root, whole_source)
    # The second run's startup re-checked the first crash's blob (intact) before journaling its own.
    crash_after_rename(root, torn_source)
    assert journal_lines(root) == [torn_hex]
    # What a power cut does to bytes that never reached the disk: the tail is zeros, the name survives.
    with open(root / "blobs" / "sha256" / torn_hex, "r+b") as handle:
        handle.seek(1 << 20)
        handle.write(b"\0" * (2 << 20))
    # A journal line the cut tore in half names nothing and is ignored.
    with open(root / JOURNAL_NAME, "a") as handle:
        handle.write("0123abc")
    async with running_storage(tmp_path, etcd, etcd_prefix, background_flush_min_bytes=1 << 20) as (app, stub):
        # Checked before the service answered anything: the torn blob is gone, the whole one served.
        assert stored_names(app) == [whole_hex]
        assert [p.name.split(".")[0] for p in app.store.quarantine_dir.iterdir()] == [torn_hex]
        assert app.store.recovered.quarantined == [f"sha256:{torn_hex}"]
        assert journal_lines(root) == []
        # Pulling the content again stores it afresh and verified.
        messages = await pull(stub, f"file://{torn_source}", expected=digest_of(torn))
        assert messages[-1].blob.digest == digest_of(torn)
        assert (app.store.blob_dir / torn_hex).read_bytes() == torn
    # A clean stop flushed everything: nothing is left for the next start to re-check.
    assert journal_lines(root) == []



@pytest.mark.unit
async def test_journaled_blob_whose_rename_was_lost_is_simply_absent(tmp_path, executor):
    root = tmp_path / "s"
    root.mkdir()
    # The entry reached the disk, the rename did not (or the blob was deleted since): nothing to check.
    (root / JOURNAL_NAME).write_text("ab" * 32 + "\n")
    store = BlobStore(root, executor)
    await store.prepare()
    assert store.recovered.checked == 0 and store.recovered.quarantined == []
    assert journal_lines(root) == [] and await store.list() == []


@pytest.mark.unit
async def test_journal_removed_under_a_running_store_is_recreated(tmp_path, executor):
    store = BlobStore(tmp_path / "s", executor, background_flush_min_bytes=1 << 20)
    await store.prepare()
    (store.root / JOURNAL_NAME).unlink()
    info = await store_bytes(store, os.urandom(1 << 20))
    assert await store.flushed(30)
    assert (store.root / JOURNAL_NAME).exists() and journal_lines(store.root) == []
    assert [b.digest for b in await store.list()] == [info.digest]
    await store.close()
