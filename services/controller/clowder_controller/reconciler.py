"""The reconciler: level-triggered, idempotent loop turning deployments into running replicas.

Each pass compares what etcd says is wanted (deployments) with what exists
(replicas, nodes, endpoints, processes) and starts one bounded action per
replica that is off; actions run as tasks so one slow pull never stalls the
others. Any pass can be repeated, or run after a crash, and converges.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
import uuid
from collections import defaultdict
from typing import Awaitable, Callable

from clowder.controller.v1 import resources_pb2
from clowder.runtime.v1 import runtime_pb2
from clowder_common import keys
from clowder_common.etcd import EtcdState, PrefixCache
from clowder_controller.config import ControllerConfig
from clowder_controller.images import record_digest
from clowder_controller.launcher import Launcher, RuntimeSpec, RuntimeState
from clowder_controller.storage_client import StorageClients

log = logging.getLogger(__name__)

ReplicaState = resources_pb2.ReplicaState
PENDING = resources_pb2.REPLICA_STATE_PENDING
PULLING = resources_pb2.REPLICA_STATE_PULLING
STARTING = resources_pb2.REPLICA_STATE_STARTING
READY = resources_pb2.REPLICA_STATE_READY
FAILED = resources_pb2.REPLICA_STATE_FAILED

MAX_BACKOFF_S = 30.0
NO_NODE_MESSAGE = "waiting for a storage node to register"


def backoff_delay(failures: int) -> float:
    """0 s for the first retry, then 1, 2, 4 ... up to 30 s."""
    return 0.0 if failures <= 0 else min(2.0 ** (failures - 1), MAX_BACKOFF_S)


class Reconciler:
    def __init__(self, state: EtcdState, storage: StorageClients, launcher: Launcher,
                 config: ControllerConfig) -> None:
        self._state = state
        self._storage = storage
        self._launcher = launcher
        self._config = config
        self._wake = asyncio.Event()

        def cache(prefix: str, cls):
            return PrefixCache(state, state.key(prefix), cls, on_change=self._wake.set)

        self._deployments = cache(keys.DEPLOYMENTS, resources_pb2.Deployment)
        self._replicas = cache(keys.REPLICAS, resources_pb2.Replica)
        self._nodes = cache(keys.NODES, resources_pb2.Node)
        self._endpoints = cache(keys.ENDPOINTS, runtime_pb2.Endpoint)
        self._images = cache(keys.IMAGES, resources_pb2.Image)
        self._caches = [self._deployments, self._replicas, self._nodes, self._endpoints, self._images]
        # One action at a time per replica; the pass skips replicas that are busy.
        self._busy: dict[str, asyncio.Task] = {}
        self._failures: dict[str, int] = defaultdict(int)
        self._not_before: dict[str, float] = {}
        self._loop_task: asyncio.Task | None = None

    async def start(self) -> None:
        for cache in self._caches:
            await cache.start()
        self._loop_task = asyncio.create_task(self._run(), name="reconciler")

    async def stop(self) -> None:
        if self._loop_task is not None:
            self._loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop_task
            self._loop_task = None
        tasks = list(self._busy.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for cache in self._caches:
            await cache.stop()

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._config.resync_interval_s)
            self._wake.clear()
            # Let a burst of etcd events settle into one pass.
            await asyncio.sleep(0.05)
            try:
                await self.reconcile_once()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("reconcile pass failed; the next pass retries")

    # -- one pass ----------------------------------------------------------------

    async def reconcile_once(self) -> None:
        if not all(cache.ready for cache in self._caches):
            return
        deployments = {d.name: d for d in self._deployments.values()}
        images = {i.alias: i for i in self._images.values()}
        nodes = {n.name: n for n in self._nodes.values()}
        endpoints = {(e.deployment, e.replica_id): e for e in self._endpoints.values()}
        by_deployment: dict[str, list[resources_pb2.Replica]] = defaultdict(list)
        for replica in self._replicas.values():
            by_deployment[replica.deployment].append(replica)

        for name, replicas in by_deployment.items():
            if name not in deployments:
                for replica in replicas:
                    self._act(replica, self._remove(replica))

        for deployment in deployments.values():
            replicas = sorted(by_deployment.get(deployment.name, []), key=lambda r: r.id)
            excess = len(replicas) - deployment.replicas
            if excess > 0:
                # Stop the least useful first: not ready before ready, newest before oldest.
                victims = sorted(replicas, key=lambda r: (r.state == READY, -r.update_time.seconds))[:excess]
                for replica in victims:
                    self._act(replica, self._remove(replica))
                replicas = [r for r in replicas if r not in victims]
            elif excess < 0:
                for _ in range(-excess):
                    await self._create_replica(deployment)
            for replica in replicas:
                self._drive(deployment, replica, images, nodes, endpoints)

    async def _create_replica(self, deployment: resources_pb2.Deployment) -> None:
        replica = resources_pb2.Replica(
            id=uuid.uuid4().hex[:8], deployment=deployment.name, state=PENDING, message="waiting for placement"
        )
        replica.update_time.GetCurrentTime()
        await self._state.create(self._state.key(keys.replica(deployment.name, replica.id)), replica)
        log.info("replica %s/%s created", deployment.name, replica.id)

    def _drive(self, deployment, replica, images, nodes, endpoints) -> None:
        """Decide the next action for one replica; at most one runs at a time."""
        if replica.id in self._busy:
            return
        image = images.get(deployment.image)
        if image is None:
            self._act(replica, self._set(replica, FAILED, f"image {deployment.image!r} does not exist"))
            return
        node = nodes.get(replica.node) if replica.node else None
        if node is None:
            placed = self._place(nodes)
            if placed is None:
                if replica.state != PENDING or replica.node or replica.message != NO_NODE_MESSAGE:
                    self._act(replica, self._requeue(replica, NO_NODE_MESSAGE))
                return
            self._act(replica, self._start(deployment, replica, placed, image), gated=True)
            return
        if replica.state in (PENDING, PULLING, FAILED):
            # Nothing is working on it (not busy): begin, or retry after backoff.
            self._act(replica, self._start(deployment, replica, node, image), gated=True)
            return
        status = self._launcher.status(replica)
        if status.state is RuntimeState.EXITED:
            why = "runtime exited" + (f" with code {status.exit_code}" if status.exit_code is not None else "")
            self._act(replica, self._start(deployment, replica, node, image, restart_reason=why), gated=True)
            return
        endpoint = endpoints.get((deployment.name, replica.id))
        if endpoint is not None:
            if replica.state != READY or replica.endpoint != endpoint.address:
                self._failures.pop(replica.id, None)
                self._act(replica, self._set(replica, READY, "serving", endpoint=endpoint.address))
            return
        if replica.state == READY:
            self._act(replica, self._set(replica, STARTING, "endpoint lease lost; waiting for the runtime"))
        elif time.time() - replica.update_time.seconds > self._config.runtime_start_timeout_s:
            self._act(replica, self._start(deployment, replica, node, image,
                                           restart_reason="runtime did not become ready in time"), gated=True)

    def _place(self, nodes: dict[str, resources_pb2.Node]) -> resources_pb2.Node | None:
        """Spread: the node with the fewest replicas, ties by name."""
        if not nodes:
            return None
        load: dict[str, int] = defaultdict(int)
        for replica in self._replicas.values():
            if replica.node:
                load[replica.node] += 1
        return min(nodes.values(), key=lambda n: (load[n.name], n.name))

    def _act(self, replica: resources_pb2.Replica, action: Awaitable[None], gated: bool = False) -> None:
        if gated and time.monotonic() < self._not_before.get(replica.id, 0.0):
            action.close()  # type: ignore[attr-defined]
            return
        task = asyncio.create_task(self._guard(replica, action), name=f"replica {replica.id}")
        self._busy[replica.id] = task

    async def _guard(self, replica: resources_pb2.Replica, action: Awaitable[None]) -> None:
        try:
            await action
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            failures = self._failures[replica.id] = self._failures[replica.id] + 1
            delay = backoff_delay(failures)
            self._not_before[replica.id] = time.monotonic() + delay
            message = str(exc) or type(exc).__name__
            log.warning("replica %s/%s failed (%s); retrying in %.0fs", replica.deployment, replica.id, message,
                        delay)
            with contextlib.suppress(Exception):
                await self._write(replica, lambda r: _set_state(r, FAILED, message))
        finally:
            self._busy.pop(replica.id, None)
            self._wake.set()

    # -- actions -------------------------------------------------------------------

    async def _write(self, replica: resources_pb2.Replica,
                     mutate: Callable[[resources_pb2.Replica], None]) -> resources_pb2.Replica | None:
        """Read-modify-write on the replica's key; None if the replica is gone."""
        key = self._state.key(keys.replica(replica.deployment, replica.id))
        for _ in range(5):
            current = await self._state.get(key, resources_pb2.Replica)
            if current is None:
                return None
            updated = resources_pb2.Replica()
            updated.CopyFrom(current.value)
            mutate(updated)
            updated.update_time.GetCurrentTime()
            if await self._state.update(key, updated, current.mod_revision):
                return updated
        raise RuntimeError(f"replica {replica.id} kept changing under the reconciler")

    async def _set(self, replica, state: int, message: str, endpoint: str | None = None) -> None:
        def mutate(r: resources_pb2.Replica) -> None:
            _set_state(r, state, message)
            if endpoint is not None:
                r.endpoint = endpoint

        await self._write(replica, mutate)

    async def _requeue(self, replica, message: str) -> None:
        await self._launcher.stop(replica, self._config.runtime_stop_grace_s)

        def mutate(r: resources_pb2.Replica) -> None:
            _set_state(r, PENDING, message)
            r.node, r.endpoint, r.pid = "", "", 0

        await self._write(replica, mutate)

    async def _start(self, deployment, replica, node, image, restart_reason: str | None = None) -> None:
        """Pull the image onto the node (a no-op when present), then (re)start the runtime."""
        if restart_reason:
            log.warning("replica %s/%s: %s; starting it again", deployment.name, replica.id, restart_reason)
            await self._launcher.stop(replica, self._config.runtime_stop_grace_s)
            self._failures[replica.id] += 1
            self._not_before[replica.id] = time.monotonic() + backoff_delay(self._failures[replica.id])

        def pulling(r: resources_pb2.Replica) -> None:
            _set_state(r, PULLING, f"pulling {image.alias} onto {node.name}")
            r.node, r.endpoint = node.name, ""

        if await self._write(replica, pulling) is None:
            return
        blob = None
        async for message in self._storage.pull(node.storage_address, image.source_url, image.digest):
            if message.HasField("blob"):
                blob = message.blob
        if blob is None:
            raise RuntimeError("storage ended the pull without a blob")
        await record_digest(self._state, image.alias, blob.digest, blob.size_bytes)
        spec = RuntimeSpec(
            deployment=deployment.name,
            replica_id=replica.id,
            node=node.name,
            digest=blob.digest,
            storage_address=node.storage_address,
            configuration=image.configuration,
            threads=self._config.runtime_threads or self._threads_for(node),
        )
        pid = await self._launcher.start(spec)

        def started(r: resources_pb2.Replica) -> None:
            _set_state(r, STARTING, f"runtime started (pid {pid})" + (f" after: {restart_reason}"
                                                                      if restart_reason else ""))
            r.pid, r.image_digest = pid, blob.digest
            if restart_reason:
                r.restarts += 1

        await self._write(replica, started)

    def _threads_for(self, node: resources_pb2.Node) -> int:
        """Share the node's cores among its replicas: oversubscribed llama.cpp threads stall each other."""
        cores = node.cpus or os.cpu_count() or 1
        on_node = sum(1 for r in self._replicas.values() if r.node == node.name) or 1
        return max(1, cores // on_node)

    async def _remove(self, replica: resources_pb2.Replica) -> None:
        await self._launcher.stop(replica, self._config.runtime_stop_grace_s)
        await self._state.delete(self._state.key(keys.replica(replica.deployment, replica.id)))
        self._failures.pop(replica.id, None)
        self._not_before.pop(replica.id, None)
        log.info("replica %s/%s removed", replica.deployment, replica.id)


def _set_state(replica: resources_pb2.Replica, state: int, message: str) -> None:
    replica.state = state
    replica.message = message
