"""Partial downloads kept across a restart, so a pull interrupted by a crash resumes from what was verified."""

# A partial lives under <root>/partial/ as <key>.data (the bytes) and <key>.json (the sidecar: digest, source,
# expected size, validator, and `durable`, the length of the prefix that was flushed to disk before the sidecar
# said so). The sidecar is replaced atomically and carries a checksum of its own fields, so a torn or edited
# sidecar is detected and the partial dropped. Only `durable` bytes are trusted: a torn tail past it (power loss)
# is cut off. sha256 state cannot be saved, so a resumed pull re-hashes the prefix from disk (local reads are
# far cheaper than the network) and the whole digest is still checked at the end: a prefix that was wrong
# (tampered, or the source changed under the same name) fails that check, and the puller starts over once.
# A pull split into parallel pieces keeps only its contiguous hashed prefix: pieces finished past the first
# unfinished one are fetched again (one length in the sidecar, not a map of pieces), and the resumed pull
# fetches the remainder as one sequential ranged request. Sources that ignore ranges, or whose size or
# validator no longer match, start over from zero.
# Keyed by the expected digest: a pull without one has nothing to check a resumed prefix against, so it does
# not persist its partial.

from __future__ import annotations

import hashlib
import json
import logging
import os
import pathlib
import threading
import time
import uuid

log = logging.getLogger(__name__)

SIDECAR_VERSION = 1
# A checkpoint (fdatasync + sidecar) at most this often and only after this much progress: a crash loses
# at most about this much, and a 40 GB pull pays a few thousand cheap syncs of data it flushes anyway.
CHECKPOINT_MIN_BYTES = 4 << 20
CHECKPOINT_INTERVAL_S = 0.5
# Partials nobody resumed are collected after this long, and the oldest first when together over the cap.
DEFAULT_MAX_AGE_S = 24 * 3600.0
DEFAULT_MAX_BYTES = 64 << 30


def _check(fields: dict) -> str:
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


class Partial:
    """The sidecar of one kept partial; `checkpoint` is called from the writer threads as the hash advances."""

    def __init__(self, registry: Partials, key: str, digest: str, source: str) -> None:
        self._registry = registry
        self.key = key
        self.digest = digest
        # Only a hash of the URL: it may carry credentials.
        self.source_id = hashlib.sha256(source.encode()).hexdigest()
        self.total: int | None = None
        self.validator = ""
        self.durable = 0
        self.resumed_from = 0
        self._last_time = 0.0
        self._lock = threading.Lock()
        self.released = False

    @property
    def data_path(self) -> pathlib.Path:
        return self._registry.dir / f"{self.key}.data"

    @property
    def sidecar_path(self) -> pathlib.Path:
        return self._registry.dir / f"{self.key}.json"

    def checkpoint(self, fd: int, hashed: int, force: bool = False) -> None:
        if not force and (hashed - self.durable < CHECKPOINT_MIN_BYTES
                          or time.monotonic() - self._last_time < CHECKPOINT_INTERVAL_S):
            return
        # Another writer thread is checkpointing: the next advance will do it.
        if not self._lock.acquire(blocking=force):
            return
        try:
            if self.released:
                return
            # Bytes first, then the sidecar that vouches for them: a crash between the two only loses progress.
            os.fdatasync(fd)
            self.write_sidecar(hashed)
        finally:
            self._lock.release()

    def write_sidecar(self, durable: int) -> None:
        fields = {"version": SIDECAR_VERSION, "digest": self.digest, "source_id": self.source_id,
                  "total": self.total, "validator": self.validator, "durable": durable}
        temp = self._registry.dir / f"{self.key}.json-{uuid.uuid4().hex}.tmp"
        with open(temp, "w") as handle:
            json.dump({**fields, "check": _check(fields)}, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, self.sidecar_path)
        self.durable = durable
        self._last_time = time.monotonic()

    def remove(self) -> None:
        with self._lock:
            self.released = True
            self.sidecar_path.unlink(missing_ok=True)
            self.data_path.unlink(missing_ok=True)
        self._registry.release(self.key)

    def keep(self) -> None:
        with self._lock:
            self.released = True
        self._registry.release(self.key)


class Partials:
    """The kept partials of one store: who holds which, what to resume, what to collect."""

    def __init__(self, root: pathlib.Path, max_age_s: float = DEFAULT_MAX_AGE_S,
                 max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.dir = root / "partial"
        self.max_age_s = max_age_s
        self.max_bytes = max_bytes
        self._in_use: set[str] = set()
        self._lock = threading.Lock()

    def prepare(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.collect()

    @staticmethod
    def key_of(digest: str) -> str:
        return digest.split(":", 1)[1]

    def claim(self, digest: str, source: str) -> tuple[Partial, dict | None] | None:
        """A Partial for `digest` and its trusted sidecar (None: start fresh); None if another pull holds it."""
        key = self.key_of(digest)
        with self._lock:
            if key in self._in_use:
                return None
            self._in_use.add(key)
        self.collect()
        partial = Partial(self, key, digest, source)
        sidecar = self._read(partial)
        if sidecar is None:
            partial.data_path.unlink(missing_ok=True)
        return partial, sidecar

    def release(self, key: str) -> None:
        with self._lock:
            self._in_use.discard(key)

    def _read(self, partial: Partial) -> dict | None:
        try:
            fields = json.loads(partial.sidecar_path.read_text())
            check = fields.pop("check")
            size = partial.data_path.stat().st_size
        except (OSError, ValueError, KeyError, AttributeError):
            return None
        if (not isinstance(fields, dict) or check != _check(fields) or fields.get("version") != SIDECAR_VERSION
                or fields.get("digest") != partial.digest or not isinstance(fields.get("durable"), int)):
            log.warning("partial download %s has a torn or foreign sidecar; starting over", partial.key)
            return None
        if size < fields["durable"]:
            log.warning("partial download %s is shorter than its sidecar says; starting over", partial.key)
            return None
        return fields

    def collect(self) -> None:
        """Drop partials nobody holds that are stale, orphaned, or beyond the total size cap (oldest first)."""
        now = time.time()
        try:
            names = os.listdir(self.dir)
        except FileNotFoundError:
            return
        keys = {name.split(".", 1)[0] for name in names}
        # Held throughout: a claim waits rather than read a partial being dropped.
        with self._lock:
            self._collect(now, names, keys)

    def _collect(self, now: float, names: list[str], keys: set[str]) -> None:
        entries: list[tuple[float, int, str]] = []
        for name in names:
            if ".json-" in name and name.endswith(".tmp") and name.split(".", 1)[0] not in self._in_use:
                (self.dir / name).unlink(missing_ok=True)
        for key in keys:
            if key in self._in_use:
                continue
            data, sidecar = self.dir / f"{key}.data", self.dir / f"{key}.json"
            try:
                mtime = sidecar.stat().st_mtime
                size = data.stat().st_size
            except FileNotFoundError:
                mtime, size = -1.0, 0
            if mtime < 0 or now - mtime > self.max_age_s:
                self._drop(key, "stale" if mtime >= 0 else "orphaned")
                continue
            entries.append((mtime, size, key))
        total = sum(size for _, size, _ in entries)
        for _, size, key in sorted(entries):
            if total <= self.max_bytes:
                break
            self._drop(key, "over the size cap")
            total -= size

    def _drop(self, key: str, why: str) -> None:
        log.info("removing partial download %s (%s)", key, why)
        (self.dir / f"{key}.data").unlink(missing_ok=True)
        (self.dir / f"{key}.json").unlink(missing_ok=True)
