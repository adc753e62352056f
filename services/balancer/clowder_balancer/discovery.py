"""What the balancer can route to: deployments (the models) and their registered endpoints, cached from etcd."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Callable, Collection

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


# Shared (callers only read it), so per-model caches keyed on the configuration object hit for it too.
_NO_CONFIGURATION = resources_pb2.ImageConfiguration()


def model_not_found(name: str) -> NotFound:
    return NotFound(f"The model '{name}' does not exist", reason="MODEL_NOT_FOUND", metadata={"model": name})


class Discovery:
    """Two prefix caches: a model exists while its deployment does; its endpoints are its ready replicas."""

    def __init__(self, state: EtcdState, on_endpoints_change: Callable[[], None] | None = None) -> None:
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

    def _endpoints_changed(self) -> None:
        self._by_model = {}
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
        return self._deployments_prefix + name in self._deployments.items

    def addresses(self) -> set[str]:
        return {ep.address for ep in self._endpoints.values() if ep.address}

    def endpoints(self, name: str) -> list[ReadyEndpoint]:
        """Ready replicas of deployment `name`, in key order (a shared list: do not change it)."""
        found = self._by_model.get(name)
        if found is None:
            prefix = self._endpoints_prefix + name + "/"
            found = sorted((
                ReadyEndpoint(key.removeprefix(prefix), ep.address)
                for key, ep in self._endpoints.items.items()
                if key.startswith(prefix) and ep.address
            ), key=lambda e: e.replica_id)
            if found:  # names come from clients: remember only models that have replicas
                self._by_model[name] = found
        return found

    def models(self) -> list[ModelInfo]:
        self._check_ready()
        out = []
        for key, dep in sorted(self._deployments.items.items()):
            name = key.removeprefix(self._deployments_prefix)
            if "/" in name:
                continue
            created = dep.create_time.seconds if dep.HasField("create_time") else 0
            out.append(ModelInfo(name, created, len(self.endpoints(name))))
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
