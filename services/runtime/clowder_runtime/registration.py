"""The endpoint this replica keeps in etcd under a lease, so balancers find it and forget it when it dies."""

from __future__ import annotations

import asyncio
import logging

from clowder.runtime.v1 import adapters_pb2, runtime_pb2

from clowder_common import keys
from clowder_common.errors import Unavailable
from clowder_common.security import Tls
from clowder_common.etcd import EtcdState, LeaseKeeper
from clowder_common.tasks import cancel_and_wait

log = logging.getLogger(__name__)

# Between attempts to register while etcd does not answer.
RETRY_S = 1.0


class EndpointRegistration:
    """Registers the endpoint; an etcd that does not answer at start delays registration, never the runtime.

    A runtime that was (re)started just before an etcd outage has loaded its model and serves; exiting
    because etcd is away would turn a control-plane blip into a restart. It registers once etcd answers.
    """

    def __init__(self, endpoints: tuple[str, ...], prefix: str, endpoint: runtime_pb2.Endpoint, ttl_s: int,
                 etcd_tls: Tls | None = None) -> None:
        self._state = EtcdState(endpoints, prefix, etcd_tls)
        self._endpoint = endpoint
        self._ttl_s = ttl_s
        self._keeper: LeaseKeeper | None = None
        self._retry: asyncio.Task | None = None
        # Rewrites the endpoint after an adapter change that etcd did not take at once.
        self._republish: asyncio.Task | None = None
        self.key = self._state.key(keys.endpoint(endpoint.deployment, endpoint.replica_id))

    @property
    def registered(self) -> bool:
        return self._keeper is not None

    async def start(self) -> None:
        try:
            await self._attempt()
        except Unavailable as exc:
            log.warning("etcd does not answer (%s); serving, and registering key=%s once it does", exc, self.key)
            self._retry = asyncio.create_task(self._keep_trying(), name="endpoint-registration")

    async def _attempt(self) -> None:
        if not self._state.connected:
            await self._state.connect()
        keeper = LeaseKeeper(self._state, self._ttl_s, self._register)
        await keeper.start()
        self._keeper = keeper

    async def _keep_trying(self) -> None:
        while True:
            await asyncio.sleep(RETRY_S)
            try:
                await self._attempt()
                return
            except Unavailable as exc:
                log.debug("registering still fails: %s", exc)

    async def _register(self, lease_id: int) -> None:
        await self._state.put(self.key, self._endpoint, lease=lease_id)
        log.info("registered endpoint key=%s address=%s", self.key, self._endpoint.address)

    async def set_adapters(self, adapters: list[adapters_pb2.AdapterInfo]) -> None:
        """Rewrite the endpoint (same lease) to list these adapters; balancers watching etcd see it at once.

        While etcd does not answer, it is written once it does (and every re-registration writes it too)."""
        del self._endpoint.adapters[:]
        self._endpoint.adapters.extend(adapters)
        try:
            await self._write_current()
        except Unavailable as exc:
            log.warning("etcd does not take the endpoint's adapters (%s); trying again", exc)
            if self._republish is None or self._republish.done():
                self._republish = asyncio.create_task(self._keep_writing(), name="endpoint-adapters")

    async def _write_current(self) -> None:
        keeper = self._keeper
        if keeper is not None and keeper.lease_id is not None:
            await self._state.put(self.key, self._endpoint, lease=keeper.lease_id)
            log.info("endpoint key=%s adapters=%s", self.key, ",".join(a.name for a in self._endpoint.adapters) or "-")

    async def _keep_writing(self) -> None:
        while True:
            await asyncio.sleep(RETRY_S)
            try:
                await self._write_current()
                return
            except Unavailable as exc:
                log.debug("writing the endpoint's adapters still fails: %s", exc)

    async def stop(self) -> None:
        """Revoking the lease removes the endpoint at once; balancers stop routing here."""
        await cancel_and_wait(self._republish, timeout=10)
        self._republish = None
        await cancel_and_wait(self._retry, timeout=10)
        self._retry = None
        if self._keeper is not None:
            keeper, self._keeper = self._keeper, None
            await keeper.stop()
            log.info("endpoint withdrawn key=%s", self.key)
        await self._state.close()
