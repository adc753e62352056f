"""Space in the store: pins held by runtimes, garbage collection, LRU eviction between watermarks, verification."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
from typing import Callable, Iterable

from clowder_common.errors import InvalidArgument, ResourceExhausted

from clowder_storage.store import BlobStore, _write_atomic, parse_digest

log = logging.getLogger(__name__)

MAX_HOLDER_LEN = 200


def _now() -> float:
    # One seam for the wall clock, so pin expiry can be tested without waiting.
    return time.time()


@dataclasses.dataclass(frozen=True)
class Usage:
    used_bytes: int
    blob_count: int
    pinned_bytes: int


def validate_holder(holder: str) -> str:
    if not holder or len(holder) > MAX_HOLDER_LEN or not holder.isprintable():
        raise InvalidArgument("holder must be 1-200 printable characters (a replica id)", field="holder")
    return holder


class Space:
    """Decides which blobs may go. Pins persist in pins.json so a restart of storage keeps runtimes safe."""

    def __init__(self, store: BlobStore, referenced: Callable[[], set[str]], metadata: Callable[[], set[str]],
                 quota_bytes: int = 0, high_watermark: float = 0.9, low_watermark: float = 0.7,
                 gc_grace_s: float = 0.0) -> None:
        self._store = store
        # Digests that manifests in index.json name (manifests, configs, layers).
        self._referenced = referenced
        # Manifests and configs of stored images: never evicted, they say what to pull again.
        self._metadata = metadata
        self.quota_bytes = quota_bytes
        self._high = high_watermark
        self._low = low_watermark
        self._grace = gc_grace_s
        self._path = store.root / "pins.json"
        # holder -> digest -> expiry (monotonic-free wall clock seconds; 0 = until unpinned).
        self._pins: dict[str, dict[str, float]] = {}
        # Serializes eviction and GC so two never pick the same victims or race a pin.
        self.lock = asyncio.Lock()

    # -- pins ---------------------------------------------------------------------

    def _load_sync(self) -> None:
        try:
            raw = json.loads(self._path.read_text())
        except FileNotFoundError:
            return
        except (OSError, ValueError) as exc:
            log.warning("pins.json unreadable (%s); starting without pins", exc)
            return
        self._pins = {h: {d: float(e) for d, e in digests.items()} for h, digests in raw.items()}

    def _save_sync(self) -> None:
        _write_atomic(self._path, json.dumps(self._pins, sort_keys=True).encode(), self._store.tmp_dir)

    async def prepare(self) -> None:
        await self._store.run(self._load_sync)

    def pinned(self) -> set[str]:
        now = _now()
        return {d for digests in self._pins.values() for d, expiry in digests.items() if not expiry or expiry > now}

    async def pin(self, holder: str, digests: Iterable[str], ttl_s: float = 0) -> list[str]:
        validate_holder(holder)
        wanted = sorted(set(digests))
        for digest in wanted:
            parse_digest(digest, field="digests")
        expiry = _now() + ttl_s if ttl_s else 0.0
        async with self.lock:
            now = _now()
            # Lapsed pins are dropped here so pins.json does not grow with runtimes long gone.
            self._pins = {h: kept for h, ds in self._pins.items()
                          if (kept := {d: e for d, e in ds.items() if not e or e > now})}
            held = self._pins.setdefault(holder, {})
            for digest in wanted:
                held[digest] = expiry
                await self._store.run(self._store.touch_sync, digest)
            await self._store.run(self._save_sync)
        return wanted

    async def unpin(self, holder: str, digests: Iterable[str] = ()) -> None:
        validate_holder(holder)
        wanted = list(digests)
        for digest in wanted:
            parse_digest(digest, field="digests")
        async with self.lock:
            if not wanted:
                self._pins.pop(holder, None)
            else:
                held = self._pins.get(holder, {})
                for digest in wanted:
                    held.pop(digest, None)
                if not held:
                    self._pins.pop(holder, None)
            await self._store.run(self._save_sync)

    # -- usage, GC, eviction ------------------------------------------------------------

    async def usage(self) -> Usage:
        blobs = await self._store.list()
        pinned = self.pinned()
        return Usage(sum(b.size_bytes for b in blobs), len(blobs),
                     sum(b.size_bytes for b in blobs if b.digest in pinned))

    async def collect(self, dry_run: bool = False) -> tuple[list[str], int]:
        """Remove blobs that no manifest references and nobody pins."""
        async with self.lock:
            keep = self._referenced() | self.pinned()
            cutoff = _now() - self._grace
            victims = [b for b in await self._store.list() if b.digest not in keep
                       and (not self._grace or await self._store.run(self._store.last_used_sync, b.digest) < cutoff)]
            if not dry_run:
                for blob in victims:
                    await self._store.run(self._remove_sync, blob.digest)
        if victims:
            log.info("garbage collection %s %d blobs (%d bytes)", "would remove" if dry_run else "removed",
                     len(victims), sum(b.size_bytes for b in victims))
        return [b.digest for b in victims], sum(b.size_bytes for b in victims)

    def _remove_sync(self, digest: str) -> None:
        self._store.path_of(digest).unlink(missing_ok=True)

    async def make_room(self, needed: int) -> None:
        """Called before a pull writes `needed` bytes: evict down to the low watermark or fail up front."""
        if not self.quota_bytes:
            return
        async with self.lock:
            used = (await self.usage()).used_bytes
            if used + needed <= self.quota_bytes * self._high:
                return
            target = max(int(self.quota_bytes * self._low) - needed, 0)
            used = await self._evict_to(used, target)
            if used + needed > self.quota_bytes:
                raise ResourceExhausted(
                    f"the store cannot take {needed} more bytes: {used} of its {self.quota_bytes}-byte quota"
                    " are in use by pinned or recently needed blobs",
                    metadata={"needed_bytes": str(needed), "used_bytes": str(used),
                              "quota_bytes": str(self.quota_bytes)},
                )

    def enforce_soon(self) -> None:
        """After a blob was stored: evict down to the low watermark in the background (nothing without a quota)."""
        if not self.quota_bytes:
            return
        task = asyncio.ensure_future(self.enforce_watermarks())
        # A failed eviction is tried again after the next pull; retrieved here so asyncio does not report it.
        task.add_done_callback(lambda t: t.cancelled() or t.exception())

    async def enforce_watermarks(self) -> None:
        if not self.quota_bytes:
            return
        async with self.lock:
            used = (await self.usage()).used_bytes
            if used > self.quota_bytes * self._high:
                await self._evict_to(used, int(self.quota_bytes * self._low))

    async def _evict_to(self, used: int, target: int) -> int:
        # Unreferenced blobs go first, then referenced but unpinned layers, least recently used first;
        # manifests and configs stay (they are tiny and name what to pull again).
        referenced = self._referenced()
        pinned = self.pinned()
        blobs = await self._store.list()
        keep = pinned | self._metadata()
        candidates = [b for b in blobs if b.digest not in keep]
        last_used = {b.digest: await self._store.run(self._store.last_used_sync, b.digest) for b in candidates}
        candidates.sort(key=lambda b: (b.digest in referenced, last_used[b.digest]))
        for blob in candidates:
            if used <= target:
                break
            await self._store.run(self._remove_sync, blob.digest)
            used -= blob.size_bytes
            log.info("evicted blob %s (%d bytes) to stay under the store quota", blob.digest, blob.size_bytes)
        return used

    async def verify(self, digests: Iterable[str] = ()) -> tuple[int, list[str]]:
        wanted = list(digests)
        for digest in wanted:
            parse_digest(digest, field="digests")
        if not wanted:
            wanted = [b.digest for b in await self._store.list()]
        bad = []
        for digest in wanted:
            if not await self._store.run(self._store.verify_sync, digest):
                bad.append(digest)
        return len(wanted), bad
