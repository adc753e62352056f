"""Leader election among controllers: a lease plus a create_revision == 0 transaction on leader/controller."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import uuid
from typing import Awaitable, Callable

from clowder.controller.v1 import resources_pb2
from clowder_common.etcd import EtcdState

log = logging.getLogger(__name__)

LEADER = "leader/controller"


def new_identity() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


class LeaderElector:
    """Campaigns until elected, runs `on_elected`, and runs `on_lost` as soon as leadership may be gone.

    Leadership is assumed lost when a refresh says the lease expired, or when no
    refresh succeeded for two thirds of the TTL (etcd unreachable: another
    controller may already hold the key); the loop then campaigns again.
    """

    def __init__(self, state: EtcdState, identity: str, address: str, ttl: int,
                 on_elected: Callable[[], Awaitable[None]], on_lost: Callable[[], Awaitable[None]]) -> None:
        self._state = state
        self.identity = identity
        self._address = address
        self._ttl = max(2, ttl)
        self._on_elected = on_elected
        self._on_lost = on_lost
        self.key = state.key(LEADER)
        self.is_leader = False
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
            # Let the loop notice the flag: cancelling an in-flight keep-alive stream can hang in grpc.
            done, _ = await asyncio.wait({self._task}, timeout=self._ttl + 5)
            if not done:
                self._task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._task
            self._task = None
        await self._step_down()

    async def _pause(self, seconds: float) -> bool:
        """Sleep unless stopping; True when stop() was called."""
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), seconds)
        return self._stopping.is_set()

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
        tx = self._state.client.transactions
        key = self.key.encode()
        won, _ = await self._state.client.transaction(
            compare=[tx.create(key) == 0],
            success=[tx.put(key, value.SerializeToString(), lease=lease)],
            failure=[],
        )
        if not won:
            await self._state.revoke_lease(lease)
            return False
        self._lease = lease
        return True

    async def _run(self) -> None:
        poll = min(1.0, self._ttl / 4)
        while not self._stopping.is_set():
            try:
                if await self._campaign():
                    self.is_leader = True
                    log.info("controller %s is the leader", self.identity)
                    await self._on_elected()
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
            refresh = asyncio.ensure_future(self._state.refresh_lease(self._lease))
            refresh.add_done_callback(lambda f: f.cancelled() or f.exception())
            done, _ = await asyncio.wait({refresh}, timeout=interval)
            if refresh in done:
                try:
                    if refresh.result() <= 0:
                        log.warning("leader lease expired")
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
