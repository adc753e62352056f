"""Group limits: grouplimits/<group> in etcd, a watched copy for per-request lookups."""

from __future__ import annotations

from clowder.balancer.v1 import apikeys_pb2
from clowder_common.etcd import EtcdState, PrefixCache
from clowder_common.keys import validate_name

from clowder_balancer.apikeys import NO_LIMITS, Limits, validate_limits

GROUP_LIMITS = "grouplimits"


class GroupLimitsStore:
    def __init__(self, state: EtcdState) -> None:
        self._state = state
        self._prefix = state.key(GROUP_LIMITS, "")
        self.cache = PrefixCache(state, self._prefix, apikeys_pb2.GroupLimits)
        # Limits per group with the record they were parsed from: Limits.of once per change, not per request.
        self._parsed: dict[str, tuple[apikeys_pb2.GroupLimits, Limits]] = {}

    async def start(self) -> None:
        await self.cache.start()

    async def stop(self) -> None:
        await self.cache.stop()

    def limits(self, group: str) -> Limits:
        """A group's limits as the watched copy has them (none while it is not loaded: etcd down at start)."""
        found = self.cache.items.get(self._prefix + group)
        if found is None:
            return NO_LIMITS
        parsed = self._parsed.get(group)
        if parsed is None or parsed[0] is not found:
            parsed = self._parsed[group] = (found, Limits.of(found.limits))
        return parsed[1]

    async def set(self, group: str, limits: apikeys_pb2.KeyLimits) -> apikeys_pb2.GroupLimits:
        validate_name(group, "group")
        validate_limits(limits)
        record = apikeys_pb2.GroupLimits(group=group, limits=limits)
        if limits == apikeys_pb2.KeyLimits():
            await self._state.delete(self._prefix + group)
        else:
            await self._state.put(self._prefix + group, record)
        return record

    async def list(self) -> list[apikeys_pb2.GroupLimits]:
        items, _ = await self._state.list(self._prefix, apikeys_pb2.GroupLimits)
        return [item.value for item in items]
