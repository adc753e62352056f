"""A balancer's periodic report in etcd (its load, its revision counters): one key written every interval on a
lease, so a dead balancer's report disappears with it."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Callable

from google.protobuf.message import Message

from clowder_common.etcd import EtcdState, LeaseKeeper
from clowder_common.tasks import cancel_and_wait, run_periodically


class LeasedReport:
    """Writes `snapshot()` under `key` every `interval_s` (sooner when `wake` is set) while `due()` says there
    is something to report. A failed write (etcd down) is retried at the next tick; the lease's TTL bounds
    how stale a report can get."""

    def __init__(self, state: EtcdState, key: str, snapshot: Callable[[], Message], name: str, *,
                 interval_s: float = 1.0, lease_ttl_s: int = 5, wake: asyncio.Event | None = None,
                 due: Callable[[], bool] = lambda: True) -> None:
        self._state = state
        self._key = key
        self._snapshot = snapshot
        self._name = name
        self._interval = interval_s
        self._wake = wake
        self._due = due
        self._lease = LeaseKeeper(state, lease_ttl_s, self._write)
        self._task: asyncio.Task | None = None

    async def _write(self, lease_id: int) -> None:
        await self._state.put(self._key, self._snapshot(), lease=lease_id)

    async def start(self) -> None:
        await self._lease.start()
        self._task = asyncio.create_task(run_periodically(self._report, self._interval, self._wake, self._name),
                                         name=self._name.replace(" ", "-"))

    async def _report(self) -> None:
        lease = self._lease.lease_id
        if lease is not None and self._due():
            await asyncio.wait_for(self._write(lease), timeout=max(1.0, self._interval * 2))

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._lease.stop(), timeout=3.0)
