"""The content-addressed blob store on disk: blobs/sha256/<hex>, written through tmp/ and renamed when verified."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import errno
import hashlib
import json
import logging
import os
import pathlib
import re
import shutil
import threading
import time
import uuid
from typing import Callable, TypeVar

from clowder_common.errors import DataLoss, InvalidArgument, NotFound, ResourceExhausted

from clowder_storage.durability import Flusher, Journal, Recovered, fsync_dir, recover
from clowder_storage.resume import Partial, Partials

log = logging.getLogger(__name__)

T = TypeVar("T")

ALGORITHM = "sha256"
# Strict on purpose: the hex part becomes a file name, so nothing else may get through.
DIGEST_RE = re.compile(r"sha256:([0-9a-f]{64})")
_HEX_RE = re.compile(r"[0-9a-f]{64}")
HASH_READ_BYTES = 4 << 20
# Blobs smaller than this are flushed before they appear (cheap, and manifests are durable before an index
# names them); larger ones are flushed in the background under the journal (see durability.py).
BACKGROUND_FLUSH_MIN_BYTES = 4 << 20


def parse_digest(digest: str, field: str = "digest") -> str:
    """Return the hex part of "sha256:<64 lowercase hex>", or raise InvalidArgument naming `field`."""
    match = DIGEST_RE.fullmatch(digest or "")
    if match is None:
        raise InvalidArgument(
            f"{field} {digest[:80]!r} is not a digest: expected 'sha256:' followed by 64 lowercase hex digits",
            field=field,
        )
    return match.group(1)


@dataclasses.dataclass(frozen=True)
class BlobInfo:
    digest: str
    size_bytes: int
    # Seconds since the epoch when the blob was put in place.
    create_time: float


class TempBlob:
    """A blob being written under tmp/ while sha256 is computed over its bytes in order.

    Sequential writes hash as they go. Parallel ranged parts are written in place with `write_at` and
    hashed by `hash_through` as the contiguous prefix grows, so every byte is hashed once, in order.
    Its methods block (file I/O, hashing); callers run them off the event loop.
    """

    def __init__(self, path: pathlib.Path, limit_bytes: int = 0, partial: Partial | None = None) -> None:
        self.path = path
        # Set when the bytes are kept across a restart (resume.py): checkpoints as the hash advances.
        self.partial = partial
        # Bytes written (sequential) or the file's length (parts).
        self.size = 0
        # Largest size allowed (0: none): a source that sends more is cut off before it fills the disk.
        self.limit_bytes = limit_bytes
        self.hashed = 0
        self._hash = hashlib.sha256()
        # Parts hash from memory when they extend the prefix, the hasher reads back otherwise: one at a time.
        self._hash_lock = threading.Lock()
        # O_EXCL: a name collision must fail rather than mix two downloads (a kept partial is claimed first).
        flags = os.O_RDWR | os.O_CREAT | (0 if partial is not None else os.O_EXCL)
        self._fd: int | None = os.open(path, flags, 0o644)

    def resume_from(self, durable: int) -> None:
        """Take the first `durable` bytes already in the file: cut the untrusted tail, re-hash the prefix."""
        assert self._fd is not None
        os.ftruncate(self._fd, durable)
        self._check_limit(durable)
        self.size = durable
        self.hash_through(durable)
        os.lseek(self._fd, durable, os.SEEK_SET)

    def _advanced(self, force: bool = False) -> None:
        if self.partial is not None and self._fd is not None:
            self.partial.checkpoint(self._fd, self.hashed, force)

    def _check_limit(self, end: int) -> None:
        if self.limit_bytes and end > self.limit_bytes:
            raise ResourceExhausted(f"the blob exceeds the size limit of {self.limit_bytes} bytes",
                                    metadata={"limit_bytes": str(self.limit_bytes)})

    def write(self, chunk: bytes) -> None:
        assert self._fd is not None, "write after close"
        self._check_limit(self.size + len(chunk))
        view = memoryview(chunk)
        while view:
            written = _write(self._fd, view)
            view = view[written:]
        self._hash.update(chunk)
        self.size += len(chunk)
        self.hashed = self.size
        self._advanced()

    def reset(self) -> None:
        """Start over (the source could not resume): drop the bytes and the hash state."""
        assert self._fd is not None, "reset after close"
        os.ftruncate(self._fd, 0)
        os.lseek(self._fd, 0, os.SEEK_SET)
        self._hash = hashlib.sha256()
        self.size = self.hashed = 0
        if self.partial is not None:
            self.partial.write_sidecar(0)

    def allocate(self, size: int) -> None:
        """Size the file for parts written in place; ENOSPC shows here rather than mid-way when possible."""
        assert self._fd is not None
        self._check_limit(size)
        try:
            os.posix_fallocate(self._fd, 0, size)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise ResourceExhausted("the store's volume is full") from exc
            if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                raise
            os.ftruncate(self._fd, size)
        self.size = size

    def write_at(self, chunk: bytes, offset: int) -> None:
        assert self._fd is not None, "write after close"
        view = memoryview(chunk)
        while view:
            written = _write(self._fd, view, offset)
            view = view[written:]
            offset += written

    def write_at_hashing(self, chunk: bytes, offset: int) -> None:
        """write_at, and when the chunk continues the hashed prefix, hash it from memory (no read back)."""
        self.write_at(chunk, offset)
        if offset == self.hashed:
            with self._hash_lock:
                if offset == self.hashed:
                    self._hash.update(chunk)
                    self.hashed += len(chunk)
            self._advanced()

    def hash_through(self, stop: int) -> None:
        """Hash bytes [hashed, stop) back from the file (the page cache, just written)."""
        assert self._fd is not None
        while self.hashed < stop:
            with self._hash_lock:
                start = self.hashed
                if start >= stop:
                    break
                data = os.pread(self._fd, min(HASH_READ_BYTES, stop - start), start)
                if not data:
                    raise DataLoss("a part of the download is missing from the partial file")
                self._hash.update(data)
                self.hashed = start + len(data)
        self._advanced()

    @property
    def digest(self) -> str:
        return f"{ALGORITHM}:{self._hash.hexdigest()}"

    def check_complete(self) -> None:
        """Every byte of the file went through the hash, in order; otherwise nothing may be stored."""
        if self.hashed != self.size:
            raise DataLoss(f"only {self.hashed} of {self.size} bytes were hashed; refusing to store")

    def detach(self) -> int:
        """Hand the open descriptor over (to the background flusher); the TempBlob no longer owns it."""
        assert self._fd is not None, "detach after close"
        fd, self._fd = self._fd, None
        return fd

    def finish(self) -> None:
        """Flush to stable storage so a crash after the rename never leaves a torn blob."""
        self.check_complete()
        if self._fd is not None:
            fd, self._fd = self._fd, None
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def discard(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)
        if self.partial is not None:
            self.partial.remove()
        self.path.unlink(missing_ok=True)

    def keep(self) -> None:
        """Leave a kept partial for the next pull of its digest (checkpointed now); others are discarded."""
        if self.partial is None:
            self.discard()
            return
        try:
            if self._fd is not None:
                self.partial.checkpoint(self._fd, self.hashed, force=True)
        finally:
            if self._fd is not None:
                fd, self._fd = self._fd, None
                os.close(fd)
            self.partial.keep()


def _write(fd: int, view: memoryview, offset: int | None = None) -> int:
    try:
        return os.write(fd, view) if offset is None else os.pwrite(fd, view, offset)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise ResourceExhausted("the store's volume is full") from exc
        raise


class BlobStore:
    """Blobs by digest under `root`; readers only ever see complete, verified files."""

    def __init__(self, root: str | os.PathLike[str], executor: concurrent.futures.Executor,
                 background_flush_min_bytes: int = BACKGROUND_FLUSH_MIN_BYTES) -> None:
        self.root = pathlib.Path(root)
        self.blob_dir = self.root / "blobs" / ALGORITHM
        self.tmp_dir = self.root / "tmp"
        self.quarantine_dir = self.root / "quarantine"
        self._executor = executor
        # 0: every blob is flushed before it appears (no journal in the way).
        self._background_min = background_flush_min_bytes
        self.journal = Journal(self.root, self.tmp_dir)
        self.flusher = Flusher(self.journal, self.blob_dir, self.quarantine_dir)
        self.recovered = Recovered(0, [])
        self.partials = Partials(self.root)

    async def run(self, fn: Callable[..., T], *args) -> T:
        """Run blocking work in the store's bounded executor."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    # -- blocking primitives (executor only) -----------------------------------

    def prepare_sync(self) -> None:
        self.blob_dir.mkdir(parents=True, exist_ok=True)
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        self.quarantine_dir.mkdir(parents=True, exist_ok=True)
        layout = self.root / "oci-layout"
        if not layout.exists():
            # Marks the store as an OCI image layout, so OCI tools can read it directly.
            _write_atomic(layout, json.dumps({"imageLayoutVersion": "1.0.0"}).encode(), self.tmp_dir)
        # Before anything is served: blobs a crash may have caught before their bytes reached the disk.
        self.recovered = recover(self.journal, self.blob_dir, self.quarantine_dir)
        # Kept partials (resume.py) survive; stale, torn or orphaned ones are collected.
        self.partials.prepare()
        # Left-overs of a process that died mid-pull (pulls without a digest to resume by); only we write here.
        for stale in self.tmp_dir.iterdir():
            log.info("removing stale partial download %s", stale.name)
            if stale.is_dir():
                shutil.rmtree(stale, ignore_errors=True)
            else:
                stale.unlink(missing_ok=True)

    def path_of(self, digest: str) -> pathlib.Path:
        return self.blob_dir / parse_digest(digest)

    def stat_sync(self, digest: str) -> BlobInfo:
        path = self.path_of(digest)
        try:
            st = path.stat()
        except FileNotFoundError:
            raise NotFound(f"blob {digest} is not in the store", metadata={"digest": digest}) from None
        return BlobInfo(digest, st.st_size, st.st_mtime)

    def list_sync(self) -> list[BlobInfo]:
        blobs = []
        for entry in sorted(os.scandir(self.blob_dir), key=lambda e: e.name):
            # Anything that is not a well-formed blob name was not put there by us.
            if not _HEX_RE.fullmatch(entry.name) or not entry.is_file(follow_symlinks=False):
                continue
            try:
                st = entry.stat(follow_symlinks=False)
            except FileNotFoundError:  # deleted while listing
                continue
            blobs.append(BlobInfo(f"{ALGORITHM}:{entry.name}", st.st_size, st.st_mtime))
        return blobs

    def delete_sync(self, digest: str) -> None:
        try:
            self.path_of(digest).unlink()
        except FileNotFoundError:
            raise NotFound(f"blob {digest} is not in the store", metadata={"digest": digest}) from None

    def free_bytes_sync(self) -> int:
        return shutil.disk_usage(self.root).free

    def new_temp_sync(self, limit_bytes: int = 0) -> TempBlob:
        return TempBlob(self.tmp_dir / f"pull-{uuid.uuid4().hex}.partial", limit_bytes)

    def resumable_temp_sync(self, digest: str, source: str, limit_bytes: int = 0) -> TempBlob:
        """A temp kept across a restart for `digest`, holding the verified prefix of an earlier pull if any.

        Falls back to a plain temp when another pull holds the digest's partial.
        """
        parse_digest(digest)
        claimed = self.partials.claim(digest, source)
        if claimed is None:
            return self.new_temp_sync(limit_bytes)
        partial, sidecar = claimed
        try:
            temp = TempBlob(partial.data_path, limit_bytes, partial)
        except BaseException:
            partial.keep()
            raise
        try:
            if sidecar is not None and sidecar["durable"] > 0:
                partial.total = sidecar["total"]
                if sidecar["source_id"] == partial.source_id:
                    partial.validator = sidecar["validator"]
                temp.resume_from(sidecar["durable"])
                partial.durable = partial.resumed_from = sidecar["durable"]
                log.info("resuming the pull of %s from byte %d (prefix re-hashed from disk)", digest,
                         partial.resumed_from)
            else:
                temp.resume_from(0)
                partial.write_sidecar(0)
        except BaseException:
            temp.discard()
            raise
        return temp

    def put_bytes_sync(self, data: bytes, expected: str | None = None) -> BlobInfo:
        """Store a small blob (a manifest, a config) held in memory."""
        temp = self.new_temp_sync()
        temp.write(data)
        return self.commit_sync(temp, expected)

    def read_bytes_sync(self, digest: str, limit: int) -> bytes:
        """A small stored blob's bytes; larger than `limit` is refused (manifests are small by nature)."""
        path = self.path_of(digest)
        try:
            with open(path, "rb") as handle:
                data = handle.read(limit + 1)
        except FileNotFoundError:
            raise NotFound(f"blob {digest} is not in the store", metadata={"digest": digest}) from None
        if len(data) > limit:
            raise InvalidArgument(f"blob {digest} is larger than {limit} bytes", field="digest")
        return data

    def touch_sync(self, digest: str) -> None:
        """Record a use (access time) so eviction removes the least recently used blobs first."""
        path = self.path_of(digest)
        with contextlib.suppress(FileNotFoundError):
            st = path.stat()
            os.utime(path, ns=(time.time_ns(), st.st_mtime_ns))

    def last_used_sync(self, digest: str) -> float:
        try:
            return self.path_of(digest).stat().st_atime
        except FileNotFoundError:
            return 0.0

    def verify_sync(self, digest: str) -> bool:
        """Re-hash a stored blob; a mismatch moves it to quarantine/ (kept for inspection, never served)."""
        path = self.path_of(digest)
        hasher = hashlib.sha256()
        try:
            with open(path, "rb", buffering=0) as handle:
                while chunk := handle.read(HASH_READ_BYTES):
                    hasher.update(chunk)
        except FileNotFoundError:
            raise NotFound(f"blob {digest} is not in the store", metadata={"digest": digest}) from None
        if f"{ALGORITHM}:{hasher.hexdigest()}" == digest:
            return True
        os.replace(path, self.quarantine_dir / f"{path.name}.{int(time.time())}")
        fsync_dir(self.blob_dir)
        log.warning("blob %s failed verification (content sha256:%s); quarantined", digest, hasher.hexdigest())
        return False

    def commit_sync(self, temp: TempBlob, expected: str | None = None) -> BlobInfo:
        """Verify and move `temp` into place; the temp file is gone afterwards whatever happens.

        A digest already stored is kept as it is: each content is stored once.
        """
        try:
            temp.check_complete()
            actual = temp.digest
            if expected and actual != expected:
                raise DataLoss(
                    f"content does not match the expected digest: expected {expected}, got {actual}",
                    metadata={"expected_digest": expected, "actual_digest": actual},
                )
            hex_digest = actual.split(":", 1)[1]
            final = self.blob_dir / hex_digest
            if final.exists():
                return self.stat_sync(actual)
            # Timestamp the blob at commit, not at the last write, so create_time means "stored at".
            now = time.time()
            os.utime(temp.path, (now, now))
            if not self._background_min or temp.size < self._background_min:
                temp.finish()
                os.replace(temp.path, final)
                fsync_dir(self.blob_dir)
                return BlobInfo(actual, temp.size, now)
            # The journal entry is on disk before the name appears, so recovery knows to re-hash it.
            self.journal.add(hex_digest)
            try:
                os.replace(temp.path, final)
            except BaseException:
                self.journal.done(hex_digest)
                raise
            self.flusher.submit(temp.detach(), hex_digest)
            return BlobInfo(actual, temp.size, now)
        finally:
            temp.discard()

    def close_sync(self, timeout: float | None = None) -> None:
        """Make every stored blob durable before the process goes (the journal covers what does not finish)."""
        self.flusher.close(timeout)

    # -- async API ---------------------------------------------------------------

    async def prepare(self) -> None:
        await self.run(self.prepare_sync)

    async def close(self, timeout: float | None = None) -> None:
        # Its own thread, not the executor: the executor may already be shutting down.
        await asyncio.to_thread(self.close_sync, timeout)

    async def flushed(self, timeout: float | None = None) -> bool:
        """Wait until every stored blob is on disk (tests, benchmarks, shutdown)."""
        return await asyncio.to_thread(self.flusher.wait_idle, timeout)

    async def stat(self, digest: str) -> BlobInfo:
        parse_digest(digest)
        return await self.run(self.stat_sync, digest)

    async def find(self, digest: str) -> BlobInfo | None:
        try:
            return await self.stat(digest)
        except NotFound:
            return None

    async def list(self) -> list[BlobInfo]:
        return await self.run(self.list_sync)

    async def delete(self, digest: str) -> None:
        parse_digest(digest)
        await self.run(self.delete_sync, digest)

    async def path(self, digest: str) -> pathlib.Path:
        await self.stat(digest)
        return self.path_of(digest)

    async def free_bytes(self) -> int:
        return await self.run(self.free_bytes_sync)

    async def new_temp(self, limit_bytes: int = 0) -> TempBlob:
        return await self.run(self.new_temp_sync, limit_bytes)

    async def resumable_temp(self, digest: str, source: str, limit_bytes: int = 0) -> TempBlob:
        return await self.run(self.resumable_temp_sync, digest, source, limit_bytes)

    async def keep(self, temp: TempBlob) -> None:
        await self.run(temp.keep)

    async def write(self, temp: TempBlob, chunk: bytes) -> None:
        await self.run(temp.write, chunk)

    async def commit(self, temp: TempBlob, expected: str | None = None) -> BlobInfo:
        return await self.run(self.commit_sync, temp, expected)

    async def discard(self, temp: TempBlob) -> None:
        await self.run(temp.discard)


def _write_atomic(path: pathlib.Path, data: bytes, tmp_dir: pathlib.Path) -> None:
    """Replace `path` with `data` so readers see the old or the new file, never a torn one."""
    temp = tmp_dir / f"{path.name}-{uuid.uuid4().hex}.tmp"
    with open(temp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temp, path)
    fsync_dir(path.parent)
