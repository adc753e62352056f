"""The endpoint this replica keeps in etcd under a lease, so balancers find it and forget it when it dies."""

from __future__ import annotations

import logging

from clowder.runtime.v1 import runtime_pb2

from clowder_common import keys
from clowder_common.etcd import EtcdState, LeaseKeeper

log = logging.getLogger(__name__)


class EndpointRegistration:
    def __init__(self, endpoints: tuple[str, ...], prefix: str, endpoint: runtime_pb2.Endpoint, ttl_s: int) -> None:
        self._state = EtcdState(endpoints, prefix)
        self._endpoint = endpoint
        self._ttl_s = ttl_s
        self._keeper: LeaseKeeper | None = None
        self.key = self._state.key(keys.endpoint(endpoint.deployment, endpoint.replica_id))

    async def start(self) -> None:
        await self._state.connect()
        self._keeper = LeaseKeeper(self._state, self._ttl_s, self._register)
        try:
            await self._keeper.start()
        except BaseException:
            self._keeper = None
            await self._state.close()
            raise

    async def _register(self, lease_id: int) -> None:
        await self._state.put(self.key, self._endpoint, lease=lease_id)
        log.info("registered endpoint key=%s address=%s", self.key, self._endpoint.address)

    async def stop(self) -> None:
        """Revoking the lease removes the endpoint at once; balancers stop routing here."""
        if self._keeper is not None:
            keeper, self._keeper = self._keeper, None
            await keeper.stop()
            log.info("endpoint withdrawn key=%s", self.key)
        await self._state.close()
