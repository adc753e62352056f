"""Pulls into the store: one shared download per source URL, bounded parallelism, progress for every waiter."""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import os
import time
from typing import AsyncGenerator, AsyncIterator, Callable

from clowder_common.errors import DataLoss, FailedPrecondition, NotFound, ResourceExhausted, Unavailable

from clowder_storage.peer import PeerDirectory
from clowder_storage.sources import CHUNK_BYTES, NO_CREDENTIAL, Credential, Fetcher, Opened, Sources, redact_url
from clowder_storage.space import Space
from clowder_storage.store import BlobInfo, BlobStore, TempBlob, parse_digest
from clowder_storage.transfer import Transfer, TransferOptions

log = logging.getLogger(__name__)

# How often a reader of a growing blob looks for new bytes.
GROWING_POLL_S = 0.05


@dataclasses.dataclass(frozen=True)
class Progress:
    bytes_done: int
    # 0 when the source does not say.
    bytes_total: int
    bytes_per_second: float
    # 0 when unknown.
    eta_seconds: float


class RateMeter:
    """Transfer rate over the last few seconds, so the ETA follows the current speed, not the average."""

    def __init__(self, window_s: float = 3.0) -> None:
        self._window = window_s
        self._samples: collections.deque[tuple[float, int]] = collections.deque([(time.monotonic(), 0)])

    def add(self, done: int) -> None:
        now = time.monotonic()
        self._samples.append((now, done))
        while len(self._samples) > 2 and now - self._samples[1][0] > self._window:
            self._samples.popleft()

    def rate(self) -> float:
        # Measured up to now rather than to the last sample: a stalled source shows a falling rate.
        t0, d0 = self._samples[0]
        _, d1 = self._samples[-1]
        elapsed = time.monotonic() - t0
        return (d1 - d0) / elapsed if elapsed > 0 else 0.0


class Download:
    """One transfer from a source into the store, shared by every PullBlob call for that URL."""

    def __init__(self, url: str, fetcher: Fetcher, credential: Credential) -> None:
        self.url = url
        self.fetcher = fetcher
        self.credential = credential
        # One entry per caller waiting on this download: its expected digest, "" for none.
        self.expectations: list[str] = []
        self.bytes_done = 0
        self.bytes_total = 0
        self.started = time.monotonic()
        self.meter = RateMeter()
        self.resumes = 0
        # Holds a transfer slot (no longer queued).
        self.running = False
        # Set once nobody waits any more: a newcomer must start afresh rather than join a dying task.
        self.abandoned = False
        self.task: asyncio.Task[_Outcome] | None = None
        # The file being written and its source, while a transfer runs: other nodes may read its verified
        # (hashed) prefix as it grows (see Puller.read_growing).
        self.temp: TempBlob | None = None
        self.from_peer = False

    def advance(self, n: int) -> None:
        self.bytes_done += n
        self.meter.add(self.bytes_done)

    def progress(self) -> Progress:
        rate = self.meter.rate()
        left = self.bytes_total - self.bytes_done
        eta = left / rate if self.bytes_total and rate > 0 and left > 0 else 0.0
        return Progress(self.bytes_done, self.bytes_total, rate, eta)

    def accepts(self, digest: str) -> bool:
        """Keep the content if at least one waiter wants it; otherwise nothing is stored."""
        return any(not e or e == digest for e in self.expectations)


@dataclasses.dataclass(frozen=True)
class _Outcome:
    # None when no waiter accepted the content (checksum mismatch): it was not stored.
    blob: BlobInfo | None
    actual_digest: str


@dataclasses.dataclass(frozen=True)
class Pulled:
    """The last update of a pull: the stored blob and the transfer's final numbers."""

    blob: BlobInfo
    progress: Progress


PullUpdate = Progress | Pulled


class Puller:
    """Turns PullBlob requests into downloads; callers iterate progress and get the stored blob last."""

    def __init__(
        self,
        store: BlobStore,
        sources: Sources,
        space: Space,
        on_stored: Callable[[], None],
        max_parallel: int,
        progress_interval_s: float = 0.2,
        reserve_free_bytes: int = 0,
        options: TransferOptions | None = None,
        max_blob_bytes: int = 0,
        peers: PeerDirectory | None = None,
        origin_allowed: bool = True,
    ) -> None:
        self._store = store
        self._sources = sources
        # Makes room before a transfer (ResourceExhausted when the quota cannot take it) and evicts after one.
        self._space = space
        # Free space moved: the node record says so soon.
        self._on_stored = on_stored
        self._slots = asyncio.Semaphore(max_parallel)
        self._interval = progress_interval_s
        self._reserve = reserve_free_bytes
        self._options = options or TransferOptions()
        self._max_blob = max_blob_bytes
        # With peers (config.peer_pulls), a pull named by digest copies from another node that holds the blob
        # before its origin; None when the node pulls only from origins.
        self._peers = peers
        # False on an air-gapped node: blobs come only from peers, never from their URLs.
        self._origin_allowed = origin_allowed
        self._downloads: dict[str, Download] = {}
        self._closing = False

    @property
    def active(self) -> int:
        return len(self._downloads)

    def check(self, url: str) -> None:
        """Fail fast on a URL no fetcher takes (InvalidArgument)."""
        self._sources.resolve(url)

    def pending_bytes(self, exclude: Download | None = None) -> int:
        """Bytes running transfers have yet to write: promised space."""
        return sum(max(d.bytes_total - d.bytes_done, 0) for d in self._downloads.values() if d is not exclude)

    async def pull(self, url: str, expected_digest: str = "",
                   credential: Credential = NO_CREDENTIAL) -> AsyncGenerator[PullUpdate, None]:
        """Progress updates at most every `progress_interval_s`, then one Pulled."""
        fetcher = self._sources.resolve(url)
        if expected_digest:
            parse_digest(expected_digest, field="expected_digest")
            found = await self._store.find(expected_digest)
            if found is not None:
                yield Pulled(found, Progress(found.size_bytes, found.size_bytes, 0.0, 0.0))
                return
        if self._closing:
            raise Unavailable("storage is shutting down", retry_after=1.0)
        download = self._downloads.get(url)
        if download is None or download.abandoned:
            download = Download(url, fetcher, credential)
            self._downloads[url] = download
            download.task = asyncio.create_task(self._run(download), name=f"pull {redact_url(url)}")
            download.task.add_done_callback(_retrieve)
        else:
            log.info("joining the download of %s already under way", redact_url(url))
        assert download.task is not None
        download.expectations.append(expected_digest)
        try:
            shown = -1
            while True:
                done, _ = await asyncio.wait({download.task}, timeout=self._interval)
                if done:
                    break
                # A queued pull says so (0 done); a running one speaks once bytes move, not while it connects.
                if download.bytes_done != shown and (download.bytes_done > 0 or not download.running):
                    shown = download.bytes_done
                    yield download.progress()
            if download.task.cancelled():
                raise Unavailable("storage is shutting down", retry_after=1.0)
            outcome = download.task.result()
            if outcome.blob is None and not expected_digest:
                # Joined a pull whose other callers all expected different content, which was dropped.
                raise DataLoss(
                    f"content of {redact_url(url)} ({outcome.actual_digest}) matched no digest the pull"
                    " expected and was not stored; pull again",
                    metadata={"actual_digest": outcome.actual_digest},
                )
            if expected_digest and outcome.actual_digest != expected_digest:
                raise DataLoss(
                    f"content of {redact_url(url)} does not match the expected digest:"
                    f" expected {expected_digest}, got {outcome.actual_digest}",
                    metadata={"expected_digest": expected_digest, "actual_digest": outcome.actual_digest},
                )
            blob = outcome.blob
            assert blob is not None
            elapsed = max(time.monotonic() - download.started, 1e-9)
            # Keep bytes_done an honest count of transferred bytes; a stored blob reports its size.
            yield Pulled(blob, Progress(blob.size_bytes, blob.size_bytes, download.bytes_done / elapsed, 0.0))
        finally:
            download.expectations.remove(expected_digest)
            if not download.expectations and not download.task.done():
                # The last caller left (cancelled): stop the transfer; its temp file is removed.
                log.info("pull of %s abandoned by every caller; cancelling", redact_url(url))
                download.abandoned = True
                download.task.cancel()

    async def _run(self, download: Download) -> _Outcome:
        shown = redact_url(download.url)
        try:
            async with self._slots:
                download.running = True
                # Named by digest, a blob can come from any node that holds it; without one, only from its URL.
                digest = next((e for e in download.expectations if e), "")
                if self._peers is not None and digest and download.fetcher is not self._peers.fetcher:
                    outcome = await self._from_cluster(download, digest)
                elif not self._origin_allowed:
                    raise FailedPrecondition(
                        f"this node pulls only from its peers (air-gapped) and a peer is found by digest:"
                        f" pull {shown} with expected_digest", reason="PEERS_ONLY")
                else:
                    outcome = await self._fetch(download, download.fetcher, download.url, download.credential)
            if outcome.blob is not None:
                log.info("pulled %s as %s (%d bytes, %d resumes)", shown, outcome.blob.digest,
                         outcome.blob.size_bytes, download.resumes)
                self._on_stored()
                # Over the high watermark after a pull: evict in the background, the pull itself is done.
                self._space.enforce_soon()
            return outcome
        finally:
            if self._downloads.get(download.url) is download:
                del self._downloads[download.url]

    async def _from_cluster(self, download: Download, digest: str) -> _Outcome:
        """Copy from a node that holds the blob; else read the origin if no other node is reading it; else
        chain from the node that is: read its download as it grows (the claim is held on that node's lease, so
        a dead claimant's claim goes; a failed chain starts this loop over)."""
        assert self._peers is not None
        shown = redact_url(download.url)
        waited_for = ""
        while True:
            try:
                holders = await self._peers.holders(digest)
            except Unavailable as exc:
                if not self._origin_allowed:
                    raise
                # etcd away: nobody can be asked, and the origin still works.
                log.warning("cannot look for peers holding %s (%s); reading %s", digest, exc, shown)
                return await self._fetch(download, download.fetcher, download.url, download.credential)
            for url in holders:
                try:
                    outcome = await self._fetch(download, self._peers.fetcher, url, NO_CREDENTIAL, resumable=False)
                except (Unavailable, NotFound, DataLoss) as exc:
                    # A peer that went away, evicted the blob or sent other bytes: the next one, or the origin.
                    log.warning("pull of %s from %s failed (%s); trying elsewhere", digest, redact_url(url), exc)
                    download.advance(-download.bytes_done)
                    continue
                if outcome.blob is not None:
                    log.info("pulled %s from peer %s instead of %s", digest, redact_url(url), shown)
                    return outcome
                log.warning("peer %s sent content %s for %s; trying elsewhere", redact_url(url),
                            outcome.actual_digest, digest)
                download.advance(-download.bytes_done)
            if self._origin_allowed and await self._claim(digest):
                stored = False
                try:
                    outcome = await self._fetch(download, download.fetcher, download.url, download.credential)
                    stored = outcome.blob is not None
                    return outcome
                finally:
                    # Shielded: a cancelled pull must still let the waiting nodes go (else they wait for the TTL).
                    await asyncio.shield(self._release(digest, stored))
            try:
                claimant, url = await self._peers.claimant(digest)
            except Unavailable as exc:
                log.warning("cannot see who reads %s from its origin (%s); looking again", digest, exc)
                claimant, url = "", ""
                if not self._origin_allowed:
                    raise
            if not claimant and not self._origin_allowed:
                raise Unavailable(
                    f"no peer holds {digest} and this node pulls only from its peers (air-gapped)",
                    reason="NO_PEER_HOLDS_BLOB", retry_after=5.0)
            if url:
                if claimant != waited_for:
                    log.info("%s is being read from its origin by node %s; chaining from its download",
                             digest, claimant)
                    waited_for = claimant
                try:
                    outcome = await self._fetch(download, self._peers.fetcher, url, NO_CREDENTIAL, resumable=False)
                    if outcome.blob is not None:
                        log.info("pulled %s from peer %s instead of %s (chained)", digest, redact_url(url), shown)
                        return outcome
                except (Unavailable, NotFound, DataLoss) as exc:
                    # The claimant failed, died, or finished between two looks: look again.
                    log.warning("chaining %s from %s failed (%s); looking again", digest, redact_url(url), exc)
                download.advance(-download.bytes_done)
            await self._peers.wait()

    async def _claim(self, digest: str) -> bool:
        assert self._peers is not None
        try:
            return await self._peers.claim(digest)
        except Unavailable as exc:
            # etcd away: nobody can be asked, and the origin still works (a second read beats no read).
            log.warning("cannot claim the origin read of %s (%s); reading it anyway", digest, exc)
            return True

    async def _release(self, digest: str, stored: bool) -> None:
        assert self._peers is not None
        try:
            await self._peers.release(digest, stored)
        except Exception as exc:  # etcd away: the claim goes with our lease, or when we release it next time
            log.warning("could not release the origin claim on %s: %s", digest, exc)

    async def _fetch(self, download: Download, fetcher: Fetcher, url: str, credential: Credential,
                     resumable: bool = True) -> _Outcome:
        """One source into the store; the outcome names the stored blob (None: nobody wanted the content)."""
        shown = redact_url(url)
        download.started = time.monotonic()
        download.meter = RateMeter()
        found: list[BlobInfo] = []

        async def opened(first: Opened) -> bool:
            if first.digest:
                # The source vouches for a digest we already hold: no byte needs to move.
                blob = await self._store.find(first.digest)
                if blob is not None and download.accepts(first.digest):
                    found.append(blob)
                    return False
            if first.total is not None:
                download.bytes_total = first.total
                await self._check_space(download, first.total)
            return True

        vouched = getattr(fetcher, "vouched_digest", None)
        if vouched is not None:
            # Asking costs a round trip; a blob we already hold costs none of its bytes.
            digest = await vouched(url, credential)
            blob = await self._store.find(digest) if digest else None
            if blob is not None and download.accepts(digest):
                return _Outcome(blob, digest)
        # Kept across a restart only when a digest names it: it is what a resumed prefix is checked by.
        keep_as = next((e for e in download.expectations if e), "")
        for attempt in range(2):
            if keep_as and attempt == 0 and resumable:
                temp = await self._store.resumable_temp(keep_as, url, self._max_blob)
            else:
                temp = await self._store.new_temp(self._max_blob)
            resumed_from = temp.partial.resumed_from if temp.partial is not None else 0
            download.temp, download.from_peer = temp, fetcher is (self._peers.fetcher if self._peers else None)
            # The kept prefix counts as done: progress and the space promised cover only what is left.
            download.advance(temp.size)
            # A peer's copy may still be growing behind its own download: one stream in order, not pieces that
            # would wait for bytes the peer does not have yet. A peer that breaks off twice is left for the next
            # source (another peer, the origin) rather than retried as patiently as an origin.
            options = self._options if resumable else dataclasses.replace(
                self._options, parallel_parts=1, retries=min(self._options.retries, 1))
            transfer = Transfer(fetcher, url, options, self._store.run, download.advance, opened, credential)
            try:
                complete = await transfer.run(temp)
                download.resumes = transfer.resumes
                if not complete:
                    await self._store.discard(temp)
                    return _Outcome(found[0], found[0].digest)
                # No I/O: durability is the commit's business (see durability.py).
                temp.check_complete()
                actual = temp.digest
                if resumed_from and actual != keep_as:
                    # The prefix kept from before was wrong (altered on disk, or the source changed):
                    # drop it and pull the whole blob once more.
                    log.warning("pull of %s resumed at byte %d gave %s, not %s; discarding the kept"
                                " prefix and starting over", shown, resumed_from, actual, keep_as)
                    await self._store.discard(temp)
                    download.advance(-download.bytes_done)
                    continue
                if transfer.source_digest and actual != transfer.source_digest:
                    raise DataLoss(
                        f"content of {shown} does not match the digest its source published:"
                        f" expected {transfer.source_digest}, got {actual}",
                        metadata={"expected_digest": transfer.source_digest, "actual_digest": actual},
                    )
                if not download.accepts(actual):
                    await self._store.discard(temp)
                    log.warning("pull of %s: content %s matches no expected digest; not stored", shown, actual)
                    return _Outcome(None, actual)
                blob = await self._store.commit(temp)
                return _Outcome(blob, actual)
            except (asyncio.CancelledError, Unavailable):
                # Interrupted (shutdown, abandoned, source gone): what was verified stays for the next
                # pull of this digest; anything else is discarded. Shielded against a second cancel.
                await asyncio.shield(self._store.keep(temp))
                raise
            except BaseException:
                # Shielded: a second cancel must not leave the partial file behind.
                await asyncio.shield(self._store.discard(temp))
                raise
        raise AssertionError("unreachable: the second attempt never resumes")

    def growing(self, digest: str) -> Download | None:
        """The download reading `digest` from its origin on this node now, if any (what chained peers read)."""
        candidates = [d for d in self._downloads.values()
                      if digest in d.expectations and not d.abandoned and not d.from_peer]
        # One that already writes first: another download of the same digest may still be looking for peers.
        candidates.sort(key=lambda d: d.temp is None)
        return candidates[0] if candidates else None

    async def read_growing(self, digest: str, offset: int, length: int, wait_s: float,
                           heartbeat_s: float = 1.0) -> AsyncIterator[tuple[bytes, int]]:
        """(bytes, total size) of `digest` from `offset` while its download here still runs: only the hashed
        prefix, which is on disk, is served; the reader verifies the whole blob by digest as always.

        Raises NotFound when no download of `digest` runs here, Unavailable when it fails or does not start
        writing within `wait_s`. Empty chunks every `heartbeat_s` tell a waiting reader the stream is alive.
        """
        download = self.growing(digest)
        if download is None:
            raise NotFound(f"blob {digest} not found", reason="BLOB_NOT_FOUND")
        assert download.task is not None
        deadline = time.monotonic() + wait_s
        while download.temp is None or not download.bytes_total:
            if download.task.done() or time.monotonic() > deadline:
                raise Unavailable(f"the pull of {digest} on this node has not started writing", retry_after=1.0)
            await asyncio.sleep(GROWING_POLL_S)
        temp, total = download.temp, download.bytes_total
        fd = await self._store.run(os.open, temp.path, os.O_RDONLY)
        try:
            position = min(offset, total)
            stop = total if not length else min(total, position + length)
            quiet_since = time.monotonic()
            while position < stop:
                available = temp.hashed
                if download.temp is not temp or available < position:
                    # Started over (the source changed) or moved on: what was sent may not be the blob.
                    raise Unavailable(f"the pull of {digest} on this node started over", retry_after=1.0)
                if available > position:
                    data = await self._store.run(os.pread, fd, min(CHUNK_BYTES, available - position,
                                                                   stop - position), position)
                    if not data:
                        raise Unavailable(f"the pull of {digest} on this node lost its file", retry_after=1.0)
                    position += len(data)
                    quiet_since = time.monotonic()
                    yield data, total
                    continue
                if download.task.done():
                    failed = download.task.cancelled() or download.task.exception() is not None
                    if failed or temp.hashed < stop:
                        raise Unavailable(f"the pull of {digest} on this node failed", retry_after=1.0)
                    continue
                if time.monotonic() - quiet_since >= heartbeat_s:
                    quiet_since = time.monotonic()
                    yield b"", total
                await asyncio.sleep(GROWING_POLL_S)
        finally:
            await self._store.run(os.close, fd)

    async def _check_space(self, download: Download, size: int) -> None:
        if self._max_blob and size > self._max_blob:
            raise ResourceExhausted(
                f"{redact_url(download.url)} is {size} bytes, over the store's blob size limit of {self._max_blob}",
                metadata={"needed_bytes": str(size), "limit_bytes": str(self._max_blob)},
            )
        pending = self.pending_bytes(exclude=download)
        await self._space.make_room(size + pending)
        free = await self._store.free_bytes()
        # Other transfers will still write their remaining bytes to the same volume.
        if size + pending + self._reserve > free:
            raise ResourceExhausted(
                f"not enough space for {redact_url(download.url)}: it needs {size} bytes,"
                f" {free} are free ({pending} promised to other pulls, {self._reserve} kept in reserve)",
                metadata={"needed_bytes": str(size), "free_bytes": str(free)},
            )

    async def close(self) -> None:
        """Cancel every transfer and wait for their temp files to be removed."""
        self._closing = True
        tasks = [d.task for d in self._downloads.values() if d.task is not None]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)


def _retrieve(task: asyncio.Task) -> None:
    # Every waiter reads the result; this only keeps asyncio from warning when none is left to.
    if not task.cancelled():
        task.exception()
