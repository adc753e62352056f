"""The blob store on a real filesystem, URL handling of the sources, and the storage config."""

from __future__ import annotations

import concurrent.futures
import hashlib
import os

import pytest

from clowder_common.config import load_config
from clowder_common.errors import DataLoss, InvalidArgument, NotFound
from clowder_storage.config import StorageConfig
from clowder_storage.sources import FileFetcher, HttpFetcher, Sources, redact_url
from clowder_storage.store import BlobStore, parse_digest

pytestmark = pytest.mark.unit


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@pytest.fixture
def executor():
    pool = concurrent.futures.ThreadPoolExecutor(2)
    yield pool
    pool.shutdown(wait=True)


@pytest.fixture
async def store(tmp_path, executor):
    st = BlobStore(tmp_path / "store", executor)
    await st.prepare()
    return st


async def put(store: BlobStore, *chunks: bytes, expected: str | None = None):
    temp = await store.new_temp()
    for chunk in chunks:
        await store.write(temp, chunk)
    return await store.commit(temp, expected)


async def test_blob_appears_only_when_committed(store):
    data = os.urandom(300_000)
    digest = digest_of(data)
    temp = await store.new_temp()
    await store.write(temp, data[:100_000])
    await store.write(temp, data[100_000:])
    # Mid-write the bytes exist only under tmp/; no reader can see a partial blob.
    assert await store.find(digest) is None
    assert [p.name for p in store.tmp_dir.iterdir()] == [temp.path.name]
    info = await store.commit(temp)
    assert info.digest == digest and info.size_bytes == len(data)
    assert (store.blob_dir / digest.split(":")[1]).read_bytes() == data
    assert list(store.tmp_dir.iterdir()) == []


async def test_same_content_is_stored_once(store):
    data = b"the same layer" * 1000
    first = await put(store, data)
    second = await put(store, data[:5000], data[5000:])
    assert second.digest == first.digest
    # The second copy was dropped: the original file (and its create time) stays.
    assert second.create_time == first.create_time
    assert [b.digest for b in await store.list()] == [first.digest]
    assert list(store.tmp_dir.iterdir()) == []


async def test_mismatch_stores_nothing(store):
    data = b"payload"
    with pytest.raises(DataLoss) as err:
        await put(store, data, expected=digest_of(b"something else"))
    assert err.value.metadata["actual_digest"] == digest_of(data)
    assert await store.list() == []
    assert list(store.tmp_dir.iterdir()) == []


async def test_delete_removes_blob(store):
    info = await put(store, b"to be deleted")
    await store.delete(info.digest)
    assert await store.find(info.digest) is None
    with pytest.raises(NotFound):
        await store.delete(info.digest)
    with pytest.raises(NotFound):
        await store.path(info.digest)


@pytest.mark.parametrize(
    "digest",
    [
        "sha256:../../etc",
        "sha256:../../etc/passwd" + "0" * 48,
        "sha256:" + "A" * 64,
        "sha256:" + "a" * 63,
        "sha256:" + "a" * 65,
        "sha256:" + "a" * 64 + "\n",
        "sha256:" + "a" * 64 + "/x",
        "sha512:" + "a" * 64,
        "a" * 64,
        "",
    ],
)
async def test_malformed_digest_never_reaches_the_filesystem(store, digest):
    with pytest.raises(InvalidArgument) as err:
        await store.stat(digest)
    assert err.value.violations[0].field == "digest"
    with pytest.raises(InvalidArgument):
        await store.delete(digest)
    with pytest.raises(InvalidArgument):
        store.path_of(digest)
    with pytest.raises(InvalidArgument) as err:
        parse_digest(digest, field="expected_digest")
    assert err.value.violations[0].field == "expected_digest"


async def test_list_skips_foreign_files(store):
    info = await put(store, b"real blob")
    (store.blob_dir / "README").write_text("not a blob")
    (store.blob_dir / ("b" * 64 + ".partial")).write_text("not a blob either")
    assert [b.digest for b in await store.list()] == [info.digest]


async def test_prepare_removes_leftover_partials(tmp_path, executor):
    first = BlobStore(tmp_path / "s", executor)
    await first.prepare()
    temp = await first.new_temp()
    await first.write(temp, b"interrupted download")
    temp.finish()  # the process "died" here without committing
    again = BlobStore(tmp_path / "s", executor)
    await again.prepare()
    assert list(again.tmp_dir.iterdir()) == []


def test_redact_url_hides_credentials_and_query():
    shown = redact_url("https://alice:hunter2@example.com:8443/models/m.gguf?X-Amz-Signature=abc#frag")
    assert shown == "https://example.com:8443/models/m.gguf?<redacted>"


@pytest.mark.parametrize(
    "url",
    [
        "",
        "ftp://example.com/m.gguf",
        "m.gguf",
        "file://relative/path",
        "file:relative",
        "file:///tmp/m.gguf?x=1",
        "http:///no-host",
        "https://example.com:99999/m.gguf",
        "http://example.com/a\nb",
    ],
)
def test_unusable_source_urls_are_invalid_argument(url, executor):
    sources = Sources([FileFetcher(lambda *a: None), HttpFetcher(1, 1, 1)])
    with pytest.raises(InvalidArgument) as err:
        sources.resolve(url)
    assert [v.field for v in err.value.violations] == ["source_url"]


def test_config_expands_data_dir_and_reads_labels_from_env():
    config = load_config(
        StorageConfig,
        env={"CLOWDER_DATA_DIR": "~/store", "CLOWDER_LABELS": "zone=a,gpu=none", "CLOWDER_LEASE_TTL_S": "7"},
    )
    assert config.data_dir == os.path.join(os.path.expanduser("~"), "store")
    assert config.labels == {"zone": "a", "gpu": "none"}
    assert config.lease_ttl_s == 7
    assert config.listen == "127.0.0.1:3093" and config.node_name == "local" and config.max_parallel_pulls == 4


@pytest.mark.parametrize(
    "overrides, field",
    [({"node_name": "Bad Name"}, "node_name"), ({"max_parallel_pulls": 0}, "max_parallel_pulls"),
     ({"listen": "3093"}, "listen")],
)
def test_config_rejects_bad_values(overrides, field):
    with pytest.raises(InvalidArgument) as err:
        load_config(StorageConfig, env={}, overrides=overrides)
    assert err.value.violations[0].field == field
