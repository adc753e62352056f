"""Runs batches: every balancer takes chunks of lines under a leased claim, sends each line through the
pipeline while its deployment has free slots, records each outcome once, and finalizes ended batches.

Durability: a line's outcome is written with a create-only transaction keyed by its position, so a line is
recorded at most once whoever runs it; a claim lives on this balancer's lease, so the chunks of a balancer
that died are taken up by another (or by itself, restarted) once the lease expires, and only the lines without
an outcome run again. Nothing but etcd and the storage service holds a batch's state.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from clowder.balancer.v1 import apikeys_pb2, batch_pb2
from clowder_common.errors import AlreadyExists, ClowderError, NotFound
from clowder_common.etcd import LeaseKeeper, PrefixCache
from clowder_common.tasks import cancel_and_wait

from clowder_balancer import request_ids
from clowder_balancer.apikeys import APIKEYS, ApiKeyStore, Limits, Principal
from clowder_balancer.batch.capacity import Capacity
from clowder_balancer.batch.invoke import Invoker, retryable
from clowder_balancer.batch.service import PURPOSE_OUTPUT, BatchApi, new_id
from clowder_balancer.batch.shapes import jsonl, result_line
from clowder_balancer.batch.store import FINALIZE_CLAIM, BatchStore
from clowder_balancer.batch.validation import ENDPOINTS, Line

log = logging.getLogger(__name__)

S = batch_pb2
# How often a worker looks again when nothing woke it (claims of others expiring, expiry of windows).
TICK_S = 1.0
# Request counts in the batch object are brought up to date this often while it runs.
COUNTS_INTERVAL_S = 1.0
RETRY_DELAY_S = 2.0
# A line over its key's rate limit waits this long and tries again (rate limits pace a batch, they do not fail it).
RATE_LIMITED_DELAY_S = 2.0
# Batch lines queue behind interactive requests when a model's slots are all taken (the fair queue's order).
BATCH_PRIORITY = apikeys_pb2.PRIORITY_CLASS_SHEDDABLE
CLAIM_INTERVAL_S = 0.5
# Ends of batch lines this recent may still show as running in the runtimes' polled stats (polled every 0.5 s).
RECENT_S = 1.0


@dataclass
class _Run:
    """What one balancer holds of one running batch."""

    batch: batch_pb2.Batch
    lines: list[Line]
    done: dict[int, bool]
    # Chunk number -> the lease it was claimed under.
    mine: dict[int, int] = field(default_factory=dict)
    pending: collections.deque[Line] = field(default_factory=collections.deque)
    tasks: dict[asyncio.Task, Line] = field(default_factory=dict)
    counted: tuple[int, int] = (-1, -1)
    # Looking for a chunk to claim costs a range read: not more often than CLAIM_INTERVAL_S while busy.
    next_claim: float = 0.0


class BatchWorker:
    def __init__(self, api: BatchApi, invoker: Invoker, capacity: Capacity, keys: ApiKeyStore, balancer: str) -> None:
        self._api = api
        self._store: BatchStore = api.store
        self._settings = api.settings
        self._invoker = invoker
        self._capacity = capacity
        self._keys = keys
        self._balancer = balancer
        self._wake = asyncio.Event()
        self._cache = PrefixCache(self._store.state, self._store.batches_prefix, S.Batch, on_change=self._wake.set)
        # Claims hang on this lease; no keys to re-create when it is lost (the runs notice the new id).
        self._lease = LeaseKeeper(self._store.state, self._settings.claim_ttl_s, self._registered)
        self._tasks: dict[str, asyncio.Task] = {}
        self._loop_task: asyncio.Task | None = None
        self._in_flight: collections.Counter[str] = collections.Counter()
        self._ended: dict[str, collections.deque[float]] = collections.defaultdict(collections.deque)

    async def _registered(self, lease_id: int) -> None:
        self._wake.set()

    async def start(self) -> None:
        await self._lease.start()
        # Not ready within the wait is fine: the cache keeps trying, and the loop finds nothing to do meanwhile.
        await self._cache.start()
        self._loop_task = asyncio.create_task(self._loop(), name="batch-worker")

    async def stop(self) -> None:
        await cancel_and_wait(self._loop_task)
        self._loop_task = None
        for task in list(self._tasks.values()):
            await cancel_and_wait(task)
        self._tasks.clear()
        await self._cache.stop()
        # Revoking the lease frees this balancer's claims at once: another balancer resumes without waiting.
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._lease.stop(), timeout=3.0)

    # -- the loop --------------------------------------------------------------------------------

    async def _loop(self) -> None:
        while True:
            self._wake.clear()
            try:
                self._pass()
            except Exception as exc:  # one bad batch must not stop the others
                log.warning("batch worker pass failed: %s", exc)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), TICK_S)

    def _pass(self) -> None:
        for task_key in [k for k, t in self._tasks.items() if t.done()]:
            del self._tasks[task_key]
        if not self._cache.ready or self._lease.lease_id is None:
            return
        for batch in sorted(self._cache.values(), key=lambda b: (b.created_at, b.id)):
            if batch.id in self._tasks:
                continue
            job = None
            if batch.status == S.BATCH_STATUS_VALIDATING:
                job = self._validate(batch.id)
            elif batch.status == S.BATCH_STATUS_IN_PROGRESS:
                job = self._run(batch.id)
            elif batch.status in (S.BATCH_STATUS_FINALIZING, S.BATCH_STATUS_CANCELLING):
                job = self._finalize(batch.id)
            if job is not None:
                self._tasks[batch.id] = asyncio.create_task(job, name=f"batch {batch.id}")

    def _current(self, batch_id: str) -> batch_pb2.Batch | None:
        return self._cache.items.get(self._store.batch_key(batch_id))

    async def _validate(self, batch_id: str) -> None:
        # The balancer that created it validates at once; one that died first leaves it to us.
        await asyncio.sleep(TICK_S)
        try:
            await self._api.validate(batch_id)
        except ClowderError as err:
            log.warning("batch %s: validation must wait: %s", batch_id, err.message)
            await asyncio.sleep(RETRY_DELAY_S)

    # -- running lines ---------------------------------------------------------------------------

    async def _run(self, batch_id: str) -> None:
        batch = self._current(batch_id)
        if batch is None:
            return
        try:
            lines, _ = await self._api.input_lines(batch)
            done = await self._store.result_outcomes(batch_id)
        except ClowderError as err:
            log.warning("batch %s: cannot load its input yet: %s", batch_id, err.message)
            await asyncio.sleep(RETRY_DELAY_S)
            return
        run = _Run(batch, lines, done)
        chunk = self._settings.chunk_lines
        chunks = (len(lines) + chunk - 1) // chunk
        last_count = 0.0
        try:
            while True:
                current = self._current(batch_id)
                if current is None or current.status != S.BATCH_STATUS_IN_PROGRESS:
                    break
                if time.time() >= current.expires_at:
                    await self._expire(batch_id)
                    break
                lease = self._lease.lease_id
                if any(held != lease for held in run.mine.values()):
                    # The lease was lost (etcd away longer than its TTL): the claims went with it.
                    log.warning("batch %s: claims lost with the lease; taking chunks anew", batch_id)
                    run.mine.clear()
                    run.pending.clear()
                if (lease is not None and len(run.pending) < self._settings.max_in_flight
                        and (not run.pending or time.monotonic() >= run.next_claim)):
                    run.next_claim = time.monotonic() + CLAIM_INTERVAL_S
                    await self._claim_next(run, chunks, lease)
                self._dispatch(run)
                if not run.tasks and not run.pending:
                    if len(run.done) >= len(lines):
                        await self._store.mutate(batch_id, _to_finalizing)
                        break
                    # The rest is claimed by others (or their claims have not expired yet): look again soon.
                    await asyncio.sleep(TICK_S)
                    run.done = await self._store.result_outcomes(batch_id)
                    continue
                if run.tasks:
                    finished, _ = await asyncio.wait(run.tasks, timeout=0.25, return_when=asyncio.FIRST_COMPLETED)
                    await self._collect(run, finished, chunk)
                else:
                    # Lines wait for a free slot: capacity is polled, so poll with it.
                    await asyncio.sleep(0.1)
                if time.monotonic() - last_count > COUNTS_INTERVAL_S:
                    last_count = time.monotonic()
                    await self._update_counts(run)
        except asyncio.CancelledError:
            # This balancer stops: its lines in flight are dropped unrecorded and run again after the restart
            # (or elsewhere once the lease goes, which stop() revokes).
            for task in run.tasks:
                task.cancel()
            raise
        except ClowderError as err:
            log.warning("batch %s: run interrupted (taken up again at the next pass): %s", batch_id, err.message)
        finally:
            # Lines already sent finish and are recorded: cancelling keeps them, expiry counts them.
            if run.tasks and not any(t.cancelled() or t.cancelling() for t in run.tasks):
                finished, _ = await asyncio.wait(run.tasks)
                with contextlib.suppress(Exception):
                    await self._collect(run, finished, chunk)
            for number, lease in list(run.mine.items()):
                with contextlib.suppress(Exception):
                    await self._store.release(batch_id, f"{number:06d}", lease)
            with contextlib.suppress(Exception):
                await self._update_counts(run)

    async def _claim_next(self, run: _Run, chunks: int, lease: int) -> None:
        chunk = self._settings.chunk_lines
        held = await self._store.claims(run.batch.id)
        for number in range(chunks):
            if number in run.mine or f"{number:06d}" in held:
                continue
            indices = range(number * chunk, min(len(run.lines), (number + 1) * chunk))
            if all(i in run.done for i in indices):
                continue
            if not await self._store.claim(run.batch.id, f"{number:06d}", self._balancer, lease):
                continue
            # Someone may have finished lines of it before their claim went: the outcomes say which.
            run.done = await self._store.result_outcomes(run.batch.id)
            todo = [run.lines[i] for i in indices if i not in run.done]
            run.mine[number] = lease
            if not todo:
                await self._store.release(run.batch.id, f"{number:06d}", lease)
                del run.mine[number]
                continue
            run.pending.extend(todo)
            return

    def _dispatch(self, run: _Run) -> None:
        while run.pending and len(run.tasks) < self._settings.max_in_flight:
            line = run.pending[0]
            if self._capacity.free(line.model, self._in_flight[line.model], self._recently_ended(line.model)) <= 0:
                return
            run.pending.popleft()
            self._in_flight[line.model] += 1
            task = asyncio.create_task(self._line(run.batch, line), name=f"batch {run.batch.id} line {line.index}")
            run.tasks[task] = line

    def _recently_ended(self, model: str) -> int:
        ended = self._ended[model]
        while ended and ended[0] < time.monotonic() - RECENT_S:
            ended.popleft()
        return len(ended)

    async def _collect(self, run: _Run, finished: set[asyncio.Task], chunk: int) -> None:
        for task in finished:
            line = run.tasks.pop(task)
            self._in_flight[line.model] -= 1
            self._ended[line.model].append(time.monotonic())
            if task.cancelled():
                continue
            if task.exception() is not None:
                # Not recorded (etcd away too long): the line runs again, or its chunk would be held forever.
                log.warning("batch %s line %d not recorded; it runs again: %s", run.batch.id, line.index,
                            task.exception())
                run.pending.append(line)
                continue
            run.done[line.index] = task.result()
            number = line.index // chunk
            indices = range(number * chunk, min(len(run.lines), (number + 1) * chunk))
            if number in run.mine and all(i in run.done for i in indices):
                await self._store.release(run.batch.id, f"{number:06d}", run.mine.pop(number))

    async def _line(self, batch: batch_pb2.Batch, line: Line) -> bool:
        """Run one line (retrying passing failures) and record its outcome; True if it succeeded."""
        kind = ENDPOINTS[batch.endpoint]
        status, body, rid = 0, {}, ""
        attempt = 0
        while True:
            rid = request_ids.new_id()
            principal = self._principal(batch.owner)
            if principal is None:
                status, body = 401, {"error": {"message": "The API key that created this batch was revoked.",
                                               "type": "authentication_error", "param": None,
                                               "code": "invalid_api_key"}}
                break
            status, body = await self._invoker.invoke(kind, line.body, principal, rid)
            if status == 429 and _error_type(body) != "insufficient_quota" and time.time() < batch.expires_at:
                await asyncio.sleep(RATE_LIMITED_DELAY_S)
                continue
            attempt += 1
            if not retryable(status) or attempt >= self._settings.max_attempts:
                break
            log.info("batch %s line %d: status %d; trying again", batch.id, line.index, status)
            await asyncio.sleep(RETRY_DELAY_S * attempt)
        result = S.BatchResult(custom_id=line.custom_id, id=new_id("batch_req_"), status_code=status,
                               request_id=rid, body_json=json.dumps(body, ensure_ascii=False))
        await self._record(batch.id, line.index, result)
        return status == 200

    async def _record(self, batch_id: str, index: int, result: batch_pb2.BatchResult) -> None:
        for attempt in range(10):
            try:
                if not await self._store.put_result(batch_id, index, result):
                    log.info("batch %s line %d was recorded already; this outcome is dropped", batch_id, index)
                return
            except ClowderError as err:
                # etcd away: the invocation is done, keep its outcome for a while rather than run it again.
                if attempt == 9:
                    raise
                log.warning("batch %s line %d: recording waits for etcd: %s", batch_id, index, err.message)
                await asyncio.sleep(1.0)

    def _principal(self, owner: str) -> Principal | None:
        """The creator's key as it is now (its groups and limits today; a revoked key stops its batches)."""
        if not owner:
            return Principal(limits=Limits(priority=BATCH_PRIORITY))
        stored = self._keys.cache.items.get(self._store.state.key(APIKEYS + owner))
        if stored is None:
            return None
        # The key's own limits and usage apply as to its interactive requests; only its queue class is lower.
        limits = dataclasses.replace(Limits.of(stored.api_key.limits), priority=BATCH_PRIORITY)
        return Principal(owner, frozenset(stored.api_key.groups), limits)

    async def _update_counts(self, run: _Run) -> None:
        outcomes = await self._store.result_outcomes(run.batch.id)
        completed = sum(1 for ok in outcomes.values() if ok)
        counts = (completed, len(outcomes) - completed)
        if counts == run.counted:
            return
        run.counted = counts

        def update(b: batch_pb2.Batch) -> bool:
            if b.status != S.BATCH_STATUS_IN_PROGRESS:
                return False
            # Another balancer may have written a later count: counts only grow.
            if b.request_counts.completed + b.request_counts.failed >= sum(counts):
                return False
            b.request_counts.completed, b.request_counts.failed = counts
            return True

        await self._store.mutate(run.batch.id, update)

    async def _expire(self, batch_id: str) -> None:
        now = int(time.time())

        def expire(b: batch_pb2.Batch) -> bool:
            if b.status != S.BATCH_STATUS_IN_PROGRESS:
                return False
            # Finalizing with expired_at set: the finalizer ends it `expired`, the rest as batch_expired lines.
            b.status, b.finalizing_at, b.expired_at = S.BATCH_STATUS_FINALIZING, now, now
            return True

        await self._store.mutate(batch_id, expire)

    # -- finalizing ------------------------------------------------------------------------------

    async def _finalize(self, batch_id: str) -> None:
        lease = self._lease.lease_id
        if lease is None or not await self._store.claim(batch_id, FINALIZE_CLAIM, self._balancer, lease):
            await asyncio.sleep(TICK_S)
            return
        try:
            await self._finish(batch_id)
        except ClowderError as err:
            log.warning("batch %s: finalizing must wait: %s", batch_id, err.message)
            await asyncio.sleep(RETRY_DELAY_S)
        finally:
            with contextlib.suppress(Exception):
                await self._store.release(batch_id, FINALIZE_CLAIM, lease)

    async def _finish(self, batch_id: str) -> None:
        """Write the output and error files, then forget the per-line records, then end the batch: each step is
        done again by whoever finalizes after a balancer died halfway, and none is done twice."""
        batch = (await self._store.get_batch(batch_id)).value
        if batch.status not in (S.BATCH_STATUS_FINALIZING, S.BATCH_STATUS_CANCELLING):
            return
        expired = batch.status == S.BATCH_STATUS_FINALIZING and batch.expired_at != 0
        if not (batch.output_file_id or batch.error_file_id):
            batch = await self._write_files(batch, expired)
        # The files hold the outcomes now (a batch with none has no files, and nothing to lose).
        await self._store.clear(batch_id)
        now = int(time.time())

        def end(b: batch_pb2.Batch) -> bool:
            if b.status not in (S.BATCH_STATUS_FINALIZING, S.BATCH_STATUS_CANCELLING):
                return False
            if b.status == S.BATCH_STATUS_CANCELLING:
                b.status, b.cancelled_at = S.BATCH_STATUS_CANCELLED, now
            elif expired:
                b.status = S.BATCH_STATUS_EXPIRED
            else:
                b.status, b.completed_at = S.BATCH_STATUS_COMPLETED, now
            return True

        ended = await self._store.mutate(batch_id, end)
        log.info("batch %s ended %s: %d succeeded, %d failed", batch_id, S.BatchStatus.Name(ended.status),
                 ended.request_counts.completed, ended.request_counts.failed)

    async def _write_files(self, batch: batch_pb2.Batch, expired: bool) -> batch_pb2.Batch:
        batch_id = batch.id
        # Lines in flight on any balancer are recorded before the files are written: wait for their claims.
        while any(name != FINALIZE_CLAIM for name in await self._store.claims(batch_id)):
            await asyncio.sleep(TICK_S)
        results = await self._store.results(batch_id)
        lines: list[Line] = []
        if batch.in_progress_at:
            lines, _ = await self._api.input_lines(batch)
        output: list[dict[str, Any]] = []
        errors: list[dict[str, Any]] = []
        for i, line in enumerate(lines):
            result = results.get(i)
            if result is None:
                if not expired:
                    continue
                result = S.BatchResult(custom_id=line.custom_id, id=new_id("batch_req_"), error_code="batch_expired",
                                       error_message="This request could not be executed before the completion "
                                                     "window expired.")
            (output if result.status_code == 200 else errors).append(result_line(result))
        hex_id = batch_id.removeprefix("batch_")
        output_id = await self._output_file(batch, f"file-{hex_id}o", f"{batch_id}_output.jsonl", output)
        error_id = await self._output_file(batch, f"file-{hex_id}e", f"{batch_id}_error.jsonl", errors)

        def files(b: batch_pb2.Batch) -> bool:
            if b.status not in (S.BATCH_STATUS_FINALIZING, S.BATCH_STATUS_CANCELLING):
                return False
            b.output_file_id, b.error_file_id = output_id, error_id
            b.request_counts.completed, b.request_counts.failed = len(output), len(errors)
            return True

        return await self._store.mutate(batch_id, files)

    async def _output_file(self, batch: batch_pb2.Batch, file_id: str, filename: str, lines: list) -> str:
        """Store one result file under a id fixed by the batch, so a finalizer that died halfway is redone
        without a second file; "" when there is nothing to put in it."""
        if not lines:
            return ""
        try:
            await self._store.get_file(file_id)
            return file_id
        except NotFound:
            pass
        owner = Principal(batch.owner)
        try:
            await self._api.create_file(owner, filename, PURPOSE_OUTPUT, jsonl(lines), file_id=file_id)
        except AlreadyExists:
            pass
        return file_id


def _error_type(body: dict) -> str:
    error = body.get("error") if isinstance(body, dict) else None
    return str(error.get("type", "")) if isinstance(error, dict) else ""


def _to_finalizing(b: batch_pb2.Batch) -> bool:
    if b.status != S.BATCH_STATUS_IN_PROGRESS:
        return False
    b.status, b.finalizing_at = S.BATCH_STATUS_FINALIZING, int(time.time())
    return True

