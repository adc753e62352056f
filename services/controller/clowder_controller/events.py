"""Deployment events: a bounded list per deployment in etcd (events/<deployment>), written in batches."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import defaultdict

from clowder.controller.v1 import resources_pb2
from clowder_common import keys
from clowder_common.etcd import EtcdState
from clowder_common.tasks import bounded, cancel_and_wait

log = logging.getLogger(__name__)

EVENTS = "events/"
# Events kept per deployment; older ones fall off the front.
MAX_EVENTS = 20
# Writes to one deployment's list at a time, so a burst (500 lost nodes) does not swamp etcd.
FLUSH_CONCURRENCY = 32
# The last flush at shutdown gives up after this long (events are informational).
FINAL_FLUSH_S = 5.0


def events_key(deployment: str) -> str:
    return EVENTS + deployment


def new_event(reason: str, message: str, replica: str = "") -> resources_pb2.DeploymentEvent:
    event = resources_pb2.DeploymentEvent(reason=reason, message=message, replica=replica)
    event.time.GetCurrentTime()
    return event


async def read_events(state: EtcdState, deployment: str) -> list[resources_pb2.DeploymentEvent]:
    found = await state.get(state.key(events_key(deployment)), resources_pb2.DeploymentEvents)
    return list(found.value.events) if found is not None else []


async def read_all_events(state: EtcdState) -> dict[str, list[resources_pb2.DeploymentEvent]]:
    items, _ = await state.list(state.key(EVENTS), resources_pb2.DeploymentEvents)
    return {i.key.rsplit("/", 1)[1]: list(i.value.events) for i in items}


class EventRecorder:
    """Queues events in memory and appends them to etcd every `interval` seconds, one write per deployment.

    Coalescing keeps the cost of events independent of how many happen; a
    deployment deleted meanwhile gets no list (the append compares on the
    deployment's existence).
    """

    def __init__(self, state: EtcdState, interval: float = 0.5, limit: int = MAX_EVENTS) -> None:
        self._state = state
        self._interval = interval
        self._limit = limit
        self._pending: dict[str, list[resources_pb2.DeploymentEvent]] = defaultdict(list)
        # What we last wrote per deployment (we are the only writer while leading).
        self._last: dict[str, bytes] = {}
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None

    def record(self, deployment: str, reason: str, message: str, replica: str = "") -> None:
        log.info("event %s %s%s: %s", deployment, reason, f"/{replica}" if replica else "", message)
        queue = self._pending[deployment]
        queue.append(new_event(reason, message, replica))
        del queue[:-self._limit]
        self._wake.set()

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="events")

    async def stop(self) -> None:
        """Flush what is queued (bounded by etcd's call timeout), then stop."""
        await cancel_and_wait(self._task)
        self._task = None
        with contextlib.suppress(Exception):
            await bounded(self.flush(), FINAL_FLUSH_S)

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            started = time.monotonic()
            try:
                await self.flush()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("writing events failed: %s", exc)
            # A slow flush (thousands of deployments at once) spaces the next one out, coalescing more
            # events per write instead of competing with the reconciler for etcd.
            await asyncio.sleep(max(self._interval, 2 * (time.monotonic() - started)))

    async def flush(self) -> None:
        pending, self._pending = self._pending, defaultdict(list)
        gate = asyncio.Semaphore(FLUSH_CONCURRENCY)

        async def one(deployment: str, events: list) -> None:
            async with gate:
                try:
                    await self._append(deployment, events)
                except Exception:
                    # Put them back for the next flush, still bounded.
                    queue = self._pending[deployment]
                    queue[:0] = events
                    del queue[:-self._limit]
                    self._wake.set()
                    raise

        results = await asyncio.gather(*(one(d, e) for d, e in pending.items()), return_exceptions=True)
        failed = [r for r in results if isinstance(r, Exception)]
        if failed:
            raise failed[0]

    async def _append(self, deployment: str, events: list[resources_pb2.DeploymentEvent]) -> None:
        """Compare on the bytes we last wrote (one round trip); a mismatch returns the stored list to merge."""
        key = self._state.key(events_key(deployment))
        dep_key = self._state.key(keys.deployment(deployment))
        base = self._last.get(deployment)
        for _ in range(5):
            merged = resources_pb2.DeploymentEvents.FromString(base) if base else resources_pb2.DeploymentEvents()
            merged.events.extend(events)
            del merged.events[:-self._limit]
            data = merged.SerializeToString()
            # No list yet: expect the key absent (mod revision 0).
            swap = await self._state.compare_and_put(
                key, data, expect_value=base, expect_mod_revision=None if base is not None else 0,
                while_present=dep_key)
            if swap.done:
                self._last[deployment] = data
                return
            if swap.orphaned:
                self._last.pop(deployment, None)
                return  # the deployment is gone: its events go with it
            base = swap.current.data if swap.current is not None else None
        raise RuntimeError(f"events of {deployment} kept changing")
