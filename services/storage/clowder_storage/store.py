"""The content-addressed blob store on disk: blobs/sha256/<hex>, written through tmp/ and renamed when verified."""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import errno
import hashlib
import logging
import os
import pathlib
import re
import shutil
import time
import uuid
from typing import Callable, TypeVar

from clowder_common.errors import DataLoss, InvalidArgument, NotFound, ResourceExhausted

log = logging.getLogger(__name__)

T = TypeVar("T")

ALGORITHM = "sha256"
# Strict on purpose: the hex part becomes a file name, so nothing else may get through.
DIGEST_RE = re.compile(r"sha256:([0-9a-f]{64})")
_HEX_RE = re.compile(r"[0-9a-f]{64}")


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
    """A blob being written: bytes go to a file under tmp/ while sha256 is computed.

    Its methods block (file I/O, hashing); the store runs them in its executor.
    """

    def __init__(self, path: pathlib.Path) -> None:
        self.path = path
        self.size = 0
        self._hash = hashlib.sha256()
        # O_EXCL: a name collision must fail rather than mix two downloads.
        self._fd: int | None = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)

    def write(self, chunk: bytes) -> None:
        assert self._fd is not None, "write after close"
        view = memoryview(chunk)
        while view:
            try:
                written = os.write(self._fd, view)
            except OSError as exc:
                if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                    raise ResourceExhausted("the store's volume is full") from exc
                raise
            view = view[written:]
        self._hash.update(chunk)
        self.size += len(chunk)

    @property
    def digest(self) -> str:
        return f"{ALGORITHM}:{self._hash.hexdigest()}"

    def finish(self) -> None:
        """Flush to stable storage so a crash after the rename never leaves a torn blob."""
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
        self.path.unlink(missing_ok=True)


class BlobStore:
    """Blobs by digest under `root`; readers only ever see complete, verified files."""

    def __init__(self, root: str | os.PathLike[str], executor: concurrent.futures.Executor) -> None:
        self.root = pathlib.Path(root)
        self.blob_dir = self.root / "blobs" / ALGORITHM
        self.tmp_dir = self.root / "tmp"
        self._executor = executor

    async def run(self, fn: Callable[..., T], *args) -> T:
        """Run blocking work in the store's bounded executor."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    # -- blocking primitives (executor only) -----------------------------------

    def prepare_sync(self) -> None:
        self.blob_dir.mkdir(parents=True, exist_ok=True)
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        # Left-overs of a process that died mid-pull; only this service writes here.
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

    def new_temp_sync(self) -> TempBlob:
        return TempBlob(self.tmp_dir / f"pull-{uuid.uuid4().hex}.partial")

    def commit_sync(self, temp: TempBlob, expected: str | None = None) -> BlobInfo:
        """Verify and move `temp` into place; the temp file is gone afterwards whatever happens.

        A digest already stored is kept as it is: each content is stored once.
        """
        try:
            temp.finish()
            actual = temp.digest
            if expected and actual != expected:
                raise DataLoss(
                    f"content does not match the expected digest: expected {expected}, got {actual}",
                    metadata={"expected_digest": expected, "actual_digest": actual},
                )
            final = self.blob_dir / actual.split(":", 1)[1]
            if final.exists():
                return self.stat_sync(actual)
            # Timestamp the blob at commit, not at the last write, so create_time means "stored at".
            now = time.time()
            os.utime(temp.path, (now, now))
            os.replace(temp.path, final)
            _fsync_dir(self.blob_dir)
            return BlobInfo(actual, temp.size, now)
        finally:
            temp.discard()

    # -- async API ---------------------------------------------------------------

    async def prepare(self) -> None:
        await self.run(self.prepare_sync)

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

    async def new_temp(self) -> TempBlob:
        return await self.run(self.new_temp_sync)

    async def write(self, temp: TempBlob, chunk: bytes) -> None:
        await self.run(temp.write, chunk)

    async def commit(self, temp: TempBlob, expected: str | None = None) -> BlobInfo:
        return await self.run(self.commit_sync, temp, expected)

    async def discard(self, temp: TempBlob) -> None:
        await self.run(temp.discard)


def _fsync_dir(path: pathlib.Path) -> None:
    # The rename is only durable once the directory entry itself is on disk.
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
