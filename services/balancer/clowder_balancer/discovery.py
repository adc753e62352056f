"""What the balancer can route to: deployments (the models) and their registered endpoints, cached from etcd."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Callable, Collection, Protocol

from clowder.controller.v1 import resources_pb2
from clowder.runtime.v1 import runtime_pb2
from clowder_common import keys
from clowder_common.errors import NotFound, Unavailable
from clowder_common.etcd import EtcdState, PrefixCache


@dataclass(frozen=True)
class ModelInfo:
    name: str
    # Unix seconds the deployment was created (0 when the controller did not say).
    created: int
    ready_replicas: int


@dataclass(frozen=True)
class ReadyEndpoint:
    replica_id: str
    address: str
    # LoRA adapters the replica lists in its endpoint (rewritten as it loads and unloads them).
    adapters: frozenset[str] = frozenset()


# Shared (callers only read it), so per-model caches keyed on the configuration object hit for it too.
_NO_CONFIGURATION = resources_pb2.ImageConfiguration()


class Services(Protocol):
    """Model names that are services (traffic_split.ServiceDirectory): they route to their revisions'
    deployments, which are listed under the service's name instead of their own."""

    def has(self, name: str) -> bool: ...

    def runs_revision(self, deployment: str) -> bool: ...

    def listed(self) -> list[tuple[str, int, list[str]]]: ...

    def stable_deployment(self, name: str) -> str: ...


def model_not_found(name: str) -> NotFound:
    return NotFound(f"The model '{name}' does not exist", reason="MODEL_NOT_FOUND", metadata={"model": name})


class Discovery:
    """Two prefix caches: a model exists while its deployment does; its endpoints are its ready replicas."""

    def __init__(self, state: EtcdState, on_endpoints_change: Callable[[], None] | None = None,
                 grace_s: float = 0.0, services: Services | None = None) -> None:
        self._services = services
        self._deployments_prefix = state.key(keys.DEPLOYMENTS)
        self._endpoints_prefix = state.key(keys.ENDPOINTS)
        self._images_prefix = state.key(keys.IMAGES)
        self._deployments = PrefixCache(state, self._deployments_prefix, resources_pb2.Deployment)
        # Images carry the configuration (allowed groups, middleware) the balancer applies per model.
        self._images = PrefixCache(state, self._images_prefix, resources_pb2.Image)
        self._on_endpoints_change = on_endpoints_change
        self._endpoints = PrefixCache(state, self._endpoints_prefix, runtime_pb2.Endpoint, self._endpoints_changed)
        # Ready replicas per model, built on first use after each change: routing asks on every request.
        self._by_model: dict[str, list[ReadyEndpoint]] = {}
        # Endpoints that left etcd less than grace_s ago, by key: (endpoint, monotonic time it left). A model
        # with no registered endpoint falls back on them (see BalancerConfig.endpoint_grace_s).
        self._grace_s = grace_s
        self._departed: dict[str, tuple[runtime_pb2.Endpoint, float]] = {}
        self._last: dict[str, runtime_pb2.Endpoint] = {}

    def _endpoints_changed(self) -> None:
        self._by_model = {}
        if self._grace_s > 0:
            current = self._endpoints.items
            now = time.monotonic()
            for key, endpoint in self._last.items():
                if key not in current and endpoint.address:
                    self._departed[key] = (endpoint, now)
            for key in current:
                self._departed.pop(key, None)
            self._last = dict(current)
        if self._on_endpoints_change is not None:
            self._on_endpoints_change()

    async def start(self) -> None:
        await asyncio.gather(self._deployments.start(), self._endpoints.start(), self._images.start())

    async def stop(self) -> None:
        await asyncio.gather(self._deployments.stop(), self._endpoints.stop(), self._images.stop())

    @property
    def ready(self) -> bool:
        return self._deployments.ready and self._endpoints.ready and self._images.ready

    def image_configuration(self, name: str) -> resources_pb2.ImageConfiguration:
        """The configuration of the aimage deployment `name` serves (empty when unknown)."""
        deployment = self._deployments.items.get(self._deployments_prefix + name)
        if deployment is None and self._services is not None and self._services.has(name):
            # A service's middleware: its stable revision's (each revision's runtime applies its own settings).
            deployment = self._deployments.items.get(self._deployments_prefix + self._services.stable_deployment(name))
        if deployment is None:
            return _NO_CONFIGURATION
        image = self._images.items.get(self._images_prefix + (deployment.image or name))
        return image.configuration if image is not None else _NO_CONFIGURATION

    def _check_ready(self) -> None:
        if not self.ready:
            # An empty cache is not an empty cluster: saying "not found" now would be a lie.
            raise Unavailable("service discovery has not loaded the cluster state yet", retry_after=1.0)

    def has_model(self, name: str) -> bool:
        self._check_ready()
        return self._deployments_prefix + name in self._deployments.items or (
            self._services is not None and self._services.has(name))

    def addresses(self) -> set[str]:
        """Addresses of registered endpoints and of those still in their grace period (stats are polled)."""
        return self.registered_addresses() | {ep.address for ep, _ in self._recently_departed().values()}

    def registered_addresses(self) -> set[str]:
        return {ep.address for ep in self._endpoints.values() if ep.address}

    def endpoints(self, name: str) -> list[ReadyEndpoint]:
        """Ready replicas of deployment `name`, in key order (a shared list: do not change it); when none is
        registered, those that left etcd less than grace_s ago (see fallback_endpoints)."""
        found = self.registered_endpoints(name)
        return found or self.fallback_endpoints(name)

    def registered_endpoints(self, name: str) -> list[ReadyEndpoint]:
        """Ready replicas of deployment `name` registered in etcd now."""
        found = self._by_model.get(name)
        if found is None:
            prefix = self._endpoints_prefix + name + "/"
            found = sorted((
                ReadyEndpoint(key.removeprefix(prefix), ep.address, frozenset(a.name for a in ep.adapters))
                for key, ep in self._endpoints.items.items()
                if key.startswith(prefix) and ep.address
            ), key=lambda e: e.replica_id)
            if found:  # names come from clients: remember only models that have replicas
                self._by_model[name] = found
        return found

    def fallback_endpoints(self, name: str) -> list[ReadyEndpoint]:
        """Replicas of `name` whose endpoint left etcd less than grace_s ago.

        After an etcd outage longer than the lease TTL, a fresh read finds no endpoint until the runtimes,
        which kept serving all along, register again: meanwhile their last known addresses still work. A
        replica that really went away refuses the connection, and connect_failed() drops it.
        """
        prefix = self._endpoints_prefix + name + "/"
        return sorted((
            ReadyEndpoint(key.removeprefix(prefix), ep.address, frozenset(a.name for a in ep.adapters))
            for key, (ep, _) in self._recently_departed().items() if key.startswith(prefix)
        ), key=lambda e: e.replica_id)

    async def wait_for_change(self, timeout: float) -> None:
        """Return once the registered endpoints change, or after `timeout` seconds."""
        await self._endpoints.wait_for_change(timeout)

    def connect_failed(self, address: str) -> None:
        """A call to `address` failed to connect: if it is a fallback, it is one no more."""
        if self._departed:
            for key in [k for k, (ep, _) in self._departed.items() if ep.address == address]:
                del self._departed[key]

    def _recently_departed(self) -> dict[str, tuple[runtime_pb2.Endpoint, float]]:
        if self._departed:
            oldest = time.monotonic() - self._grace_s
            for key in [k for k, (_, left) in self._departed.items() if left < oldest]:
                del self._departed[key]
        return self._departed

    def models(self) -> list[ModelInfo]:
        self._check_ready()
        out = []
        for key, dep in sorted(self._deployments.items.items()):
            name = key.removeprefix(self._deployments_prefix)
            if "/" in name or (self._services is not None and self._services.runs_revision(name)):
                continue
            created = dep.create_time.seconds if dep.HasField("create_time") else 0
            out.append(ModelInfo(name, created, len(self.registered_endpoints(name))))
        if self._services is not None:
            for name, created, deployments in self._services.listed():
                ready = sum(len(self.registered_endpoints(d)) for d in deployments)
                out.append(ModelInfo(name, created, ready))
            out.sort(key=lambda m: m.name)
        return out

    async def wait_for_endpoints(
        self, name: str, timeout: float, exclude: Collection[str] = ()
    ) -> list[ReadyEndpoint]:
        """Ready replicas of `name` whose address is not in `exclude`, waiting up to `timeout`
        seconds for one to register.

        NotFound if the deployment does not exist (or is deleted while we wait),
        Unavailable if none registers in time.
        """
        deadline = time.monotonic() + max(0.0, timeout)
        while True:
            if not self.has_model(name):
                raise model_not_found(name)
            found = [e for e in self.endpoints(name) if e.address not in exclude]
            if found:
                return found
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise Unavailable(
                    f"model '{name}' has no ready replica",
                    reason="NO_READY_REPLICA",
                    metadata={"model": name},
                    retry_after=5.0,
                )
            # Short slices: a deleted deployment shows up in the other cache, which this wait does not watch.
            await self._endpoints.wait_for_change(min(remaining, 1.0))
