"""One source into one partial blob: resumes after breaks, fetches large ranged sources as parallel pieces."""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import dataclasses
import logging
import math
from typing import Any, Awaitable, Callable, Iterator

from clowder_common.errors import ClowderError, Unavailable

from clowder_storage.sources import NO_CREDENTIAL, Credential, Fetcher, Opened, redact_url
from clowder_storage.store import TempBlob

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class TransferOptions:
    # Sources at least this large that serve ranges are fetched by `parallel_parts` connections at once.
    parallel_min_bytes: int = 64 << 20
    parallel_parts: int = 4
    # Each connection fetches the next piece in file order; a piece is 1/parallel_parts of the file, but at
    # least min_part_bytes (tiny ranges cost more in requests than they gain) and at most max_part_bytes.
    min_part_bytes: int = 16 << 20
    max_part_bytes: int = 128 << 20
    # Consecutive failed attempts without progress before the pull fails; progress resets the count.
    retries: int = 5
    retry_backoff_s: float = 0.2
    # Writes queued ahead of the writer thread: bounds memory while receiving overlaps hashing.
    queue_depth: int = 4


class _Pipe:
    """Ordered blocking work on one dedicated thread, at most `depth` jobs queued."""

    def __init__(self, depth: int) -> None:
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="storage-pull")
        self._depth = depth
        self._pending: collections.deque[asyncio.Future] = collections.deque()

    async def submit(self, fn: Callable[..., Any], *args: Any) -> None:
        self._pending.append(asyncio.get_running_loop().run_in_executor(self._pool, fn, *args))
        while len(self._pending) >= self._depth:
            await self._pending.popleft()

    async def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        await self.drain()
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    async def drain(self) -> None:
        while self._pending:
            await self._pending.popleft()

    async def settle(self) -> None:
        """Wait for every queued job whatever its outcome, so nothing touches the file after cleanup."""
        pending, self._pending = list(self._pending), collections.deque()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)

    def close(self) -> None:
        self._pool.shutdown(wait=False)


@dataclasses.dataclass
class _Part:
    start: int
    end: int
    done: int = 0

    @property
    def length(self) -> int:
        return self.end - self.start


class Transfer:
    """Reads `url` into `temp`. The hash always covers the bytes in order; nothing here decides what is stored."""

    def __init__(
        self,
        fetcher: Fetcher,
        url: str,
        options: TransferOptions,
        run_io: Callable[..., Awaitable[Any]],
        on_bytes: Callable[[int], None],
        on_opened: Callable[[Opened], Awaitable[bool]],
        credential: Credential = NO_CREDENTIAL,
    ) -> None:
        self._fetcher = fetcher
        self._url = url
        self._shown = redact_url(url)
        self._options = options
        self._run_io = run_io
        # Signed: a restart from zero reports the bytes it throws away as negative progress.
        self._on_bytes = on_bytes
        # Sees the first answer (size, vouched digest) and returns False to stop before any byte is read.
        self._on_opened = on_opened
        self._credential = credential
        self.source_digest = ""
        self.total: int | None = None
        self.resumes = 0
        self._validator = ""
        self._pipe = _Pipe(options.queue_depth)
        # Once split, parts retry themselves; a part that gives up ends the pull.
        self._split = False

    async def run(self, temp: TempBlob) -> bool:
        """True when `temp` holds the whole source (hashed); False when on_opened declined it."""
        try:
            return await self._sequential(temp)
        finally:
            await asyncio.shield(self._pipe.settle())
            self._pipe.close()

    async def _sequential(self, temp: TempBlob) -> bool:
        first = True
        failures = 0
        partial = temp.partial
        if partial is not None and temp.size:
            # A prefix kept from before a restart: ask its source (if it is the same) for the same version.
            self._validator = partial.validator
        while True:
            start = temp.size
            if not first and self.total is not None and start >= self.total:
                # Every byte arrived before the connection broke: nothing left to ask for.
                return True
            try:
                async with self._fetcher.open(self._url, start=start, credential=self._credential,
                                              validator=self._validator) as opened:
                    if first:
                        first = False
                        kept_total = partial.total if partial is not None else None
                        self.total, self.source_digest, self._validator = (
                            opened.total, opened.digest, opened.validator)
                        if start and (opened.start != start
                                      or (kept_total is not None and opened.total != kept_total)):
                            # The kept prefix does not fit what the source serves now: start over (and
                            # before any split, so parallel pieces never mix with old bytes).
                            log.warning("source %s cannot resume the kept prefix at byte %d; starting over",
                                        self._shown, start)
                            await self._pipe.call(temp.reset)
                            self._on_bytes(-start)
                            start = 0
                        if partial is not None:
                            partial.total, partial.validator = opened.total, opened.validator
                        if not await self._on_opened(opened):
                            return False
                        if self._splittable(opened):
                            await self._parallel(opened, temp)
                            return True
                    if opened.start != start:
                        # The source ignored the range or changed: what we have is worthless.
                        log.warning("source %s cannot resume at byte %d; starting over", self._shown, start)
                        await self._pipe.call(temp.reset)
                        self._on_bytes(-start)
                        self.total = opened.total
                    async with contextlib.aclosing(opened.chunks) as chunks:
                        async for chunk in chunks:
                            await self._pipe.submit(temp.write, chunk)
                            self._on_bytes(len(chunk))
                    await self._pipe.drain()
                if self.total is not None and temp.size < self.total:
                    raise Unavailable(f"source {self._shown} ended after {temp.size} of {self.total} bytes",
                                      reason="SOURCE_UNAVAILABLE")
                return True
            except Unavailable as exc:
                await self._pipe.settle()
                failures = 0 if temp.size > start else failures + 1
                if self._split or failures > self._options.retries:
                    raise
                self.resumes += 1
                delay = min(self._options.retry_backoff_s * 2 ** max(failures - 1, 0), 5.0)
                log.warning("pull of %s broke off after %d bytes (%s); resuming in %.1fs",
                            self._shown, temp.size, exc.message, delay)
                await asyncio.sleep(delay)

    def _splittable(self, opened: Opened) -> bool:
        return (opened.ranges and opened.start == 0 and opened.total is not None
                and self._options.parallel_parts > 1 and opened.total >= self._options.parallel_min_bytes)

    async def _parallel(self, first: Opened, temp: TempBlob) -> None:
        # SHA-256 is sequential: bytes past the first unfinished piece wait, and are read back and hashed
        # once it is done. With one fixed quarter per connection, three quarters of a 40 GB file would be
        # hashed after its last byte arrived (~16 s). Pieces at most max_part_bytes, handed out in file order,
        # keep the hashed prefix close behind the transfer, so at most a few pieces are left at the end.
        # Not smaller by default: on a loaded 2-core node a 500 MB pull in 16 or 32 MiB pieces took more CPU
        # and wall time than in four 125 MB quarters (4.3-4.5 vs 4.1 CPU-s per 5 pulls; median 0.79-0.83 s
        # vs 0.72-0.79 s), the overlap gained being smaller than the cost of more requests and hand-offs.
        total = first.total
        assert total is not None
        self._split = True
        await self._pipe.call(temp.allocate, total)
        options = self._options
        step = max(min(math.ceil(total / options.parallel_parts), options.max_part_bytes),
                   options.min_part_bytes, 1)
        parts = [_Part(start, min(start + step, total)) for start in range(0, total, step)]
        count = min(self._options.parallel_parts, len(parts))
        queue = iter(parts[1:])
        progressed = asyncio.Event()
        log.info("pulling %s as %d pieces over %d connections", self._shown, len(parts), count)
        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(self._worker(parts[0], queue, temp, progressed, first))
                for _ in range(count - 1):
                    group.create_task(self._worker(None, queue, temp, progressed, None))
                group.create_task(self._hash_in_order(parts, temp, progressed, total))
        except BaseExceptionGroup as group_error:
            # Report the source's own error (not found, unavailable...) rather than the group.
            for exc in group_error.exceptions:
                if isinstance(exc, ClowderError):
                    raise exc from None
            raise

    async def _worker(self, part: _Part | None, queue: Iterator[_Part], temp: TempBlob, progressed: asyncio.Event,
                      opened: Opened | None) -> None:
        # One connection's worth: the next unclaimed piece after each one (the iterator is shared).
        if part is not None:
            await self._part(part, temp, progressed, opened)
        for part in queue:
            await self._part(part, temp, progressed, None)

    async def _part(self, part: _Part, temp: TempBlob, progressed: asyncio.Event, opened: Opened | None) -> None:
        failures = 0
        while part.done < part.length:
            start = part.start + part.done
            try:
                if opened is not None:
                    await self._copy_part(part, temp, progressed, opened)
                    opened = None
                else:
                    async with self._fetcher.open(self._url, start=start, end=part.end,
                                                  credential=self._credential, validator=self._validator) as o:
                        if o.start != start:
                            raise Unavailable(f"source {self._shown} stopped serving byte ranges",
                                              reason="SOURCE_BAD_RANGE")
                        await self._copy_part(part, temp, progressed, o)
                if part.done < part.length:
                    raise Unavailable(f"source {self._shown} ended a part early", reason="SOURCE_UNAVAILABLE")
            except Unavailable as exc:
                opened = None
                failures = 0 if part.start + part.done > start else failures + 1
                if failures > self._options.retries:
                    raise
                self.resumes += 1
                log.warning("part at %d of %s broke off (%s); resuming", part.start, self._shown, exc.message)
                await asyncio.sleep(min(self._options.retry_backoff_s * 2 ** max(failures - 1, 0), 5.0))

    async def _copy_part(self, part: _Part, temp: TempBlob, progressed: asyncio.Event, opened: Opened) -> None:
        async with contextlib.aclosing(opened.chunks) as chunks:
            async for chunk in chunks:
                left = part.length - part.done
                if len(chunk) > left:
                    chunk = chunk[:left]
                await self._run_io(temp.write_at_hashing, chunk, part.start + part.done)
                part.done += len(chunk)
                self._on_bytes(len(chunk))
                progressed.set()
                if part.done >= part.length:
                    return

    async def _hash_in_order(self, parts: list[_Part], temp: TempBlob, progressed: asyncio.Event,
                             total: int) -> None:
        # Hashing follows the contiguous written prefix, so it overlaps the transfer and never skips a byte.
        while temp.hashed < total:
            frontier = 0
            for part in parts:
                frontier = part.start + part.done
                if part.done < part.length:
                    break
            if frontier > temp.hashed:
                await self._pipe.call(temp.hash_through, frontier)
                continue
            progressed.clear()
            await progressed.wait()
