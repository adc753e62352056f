"""Leader election among controllers: a lease plus a create_revision == 0 transaction on leader/controller.

The leader's writes are fenced by the key's create_revision (see etcd.Fence): a
leader that lost its key but has not noticed yet cannot change anything.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import uuid
from typing import Awaitable, Callable

from clowder.controller.v1 import resources_pb2
from clowder_common.etcd import CLOSE_TIMEOUT_S, EtcdState, Fence
from clowder_common.tasks import wait_event

log = logging.getLogger(__name__)

LEADER = "leader/controller"


def new_identity() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


class LeaderElector:
    """Campaigns until elected, runs `on_elected`, and runs `on_lost` as soon as leadership may be gone.

    Leadership is assumed lost when a refresh says the lease expired, when the
    key is no longer the one this term created (deleted, or another leader's),
    or when no check succeeded for two thirds of the TTL (etcd unreachable:
    another controller may already hold the key); the loop then campaigns again.
    Stepping down stops only the reconciling: runtimes keep running (the launcher
    keeps its children), and the next term picks them up as they are.
    """

    def __init__(self, state: EtcdState, identity: str, address: str, ttl: int,
                 on_elected: Callable[[Fence], Awaitable[None]], on_lost: Callable[[], Awaitable[None]]) -> None:
        self._state = state
        self.identity = identity
        self._address = address
        self._ttl = max(2, ttl)
        self._on_elected = on_elected
        self._on_lost = on_lost
        self.key = state.key(LEADER)
        self.is_leader = False
        # This term's fence; meaningful only while is_leader.
        self.fence = Fence()
        self._lease: int | None = None
        self._task: asyncio.Task | None = None
        self._stopping = asyncio.Event()

    def start(self) -> None:
        self._stopping.clear()
        self._task = asyncio.create_task(self._run(), name="leader-election")

    async def stop(self) -> None:
        """Step down: stop leading first, then delete the key so a peer takes over without waiting for the TTL."""
        self._stopping.set()
        if self._task is not None:
            task, self._task = self._task, None
            # Let the loop notice the flag: cancelling an in-flight keep-alive stream can hang in grpc.
            done, _ = await asyncio.wait({task}, timeout=self._ttl + 5)
            if not done:
                task.cancel()
                done, _ = await asyncio.wait({task}, timeout=CLOSE_TIMEOUT_S)
                if not done:
                    log.warning("leader election loop did not stop; abandoned")
        await self._step_down()

    async def _pause(self, seconds: float) -> bool:
        """Sleep unless stopping; True when stop() was called."""
        return await wait_event(self._stopping, seconds)

    async def _step_down(self) -> None:
        if self.is_leader:
            self.is_leader = False
            log.info("controller %s stops leading", self.identity)
            await self._on_lost()
        if self._lease is not None:
            lease, self._lease = self._lease, None
            # Revoking deletes the key only if it still hangs on our lease: never someone else's.
            await self._state.revoke_lease(lease)

    async def _campaign(self) -> bool:
        lease = await self._state.grant_lease(self._ttl)
        value = resources_pb2.ControllerLeader(identity=self.identity, address=self._address)
        value.acquire_time.GetCurrentTime()
        try:
            # The claim reads the key back in the same transaction: this term's create_revision, the fence
            # of its writes.
            fence = await self._state.claim(self.key, value, lease)
        except BaseException:
            await self._state.revoke_lease(lease)
            raise
        if fence is None:
            await self._state.revoke_lease(lease)
            return False
        self._lease = lease
        self.fence = fence
        return True

    async def _still_ours(self) -> bool:
        """Whether the lease lives and the key is still the one this term created (one refresh, one read)."""
        if self._lease is None or await self._state.refresh_lease(self._lease) <= 0:
            log.warning("leader lease expired")
            return False
        if not await self._state.holds(self.fence):
            log.warning("leader key is gone or another controller's: stepping down")
            return False
        return True

    async def _run(self) -> None:
        poll = min(1.0, self._ttl / 4)
        while not self._stopping.is_set():
            try:
                if await self._campaign():
                    self.is_leader = True
                    log.info("controller %s is the leader (term revision %d)", self.identity,
                             self.fence.create_revision)
                    await self._on_elected(self.fence)
                    await self._hold()
                    if self._stopping.is_set():
                        return  # stop() steps down
                    await self._step_down()
                    continue
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("leader election: %s", exc)
                with contextlib.suppress(Exception):
                    await self._step_down()
            # Someone else leads (or etcd is away): look again soon; the key vanishes with its lease.
            if await self._pause(poll):
                return

    async def _hold(self) -> None:
        """Refresh the lease until it is lost; returns when leadership can no longer be trusted."""
        loop = asyncio.get_running_loop()
        last_ok = loop.time()
        interval = self._ttl / 4
        while True:
            if await self._pause(interval):
                return
            # Not cancelled on timeout (see stop()); a late answer is dropped.
            check = asyncio.ensure_future(self._still_ours())
            check.add_done_callback(lambda f: f.cancelled() or f.exception())
            done, _ = await asyncio.wait({check}, timeout=interval)
            if check in done:
                try:
                    if not check.result():
                        return
                    last_ok = loop.time()
                except Exception as exc:
                    log.warning("leader lease refresh failed: %s", exc)
            if loop.time() - last_ok > self._ttl * 2 / 3:
                log.warning("no lease refresh for %.1fs: stepping down", loop.time() - last_ok)
                return


async def current_leader(state: EtcdState) -> resources_pb2.ControllerLeader | None:
    found = await state.get(state.key(LEADER), resources_pb2.ControllerLeader)
    return found.value if found is not None else None
