"""The reconciler: level-triggered, idempotent loop turning deployments into running replicas.

Each pass compares what etcd says is wanted (deployments) with what exists
(replicas, nodes, endpoints, processes) and starts one bounded action per
replica that is off; actions run as tasks so one slow pull never stalls the
others. Any pass can be repeated, or run after a crash, and converges.

etcd outages never reach the data plane: a node (or a runtime's endpoint) that
is missing from etcd is only acted on after it has been missing for
`node_lost_grace_s` of time during which etcd answered (AnsweringClock); a
lease that expired because etcd itself was paused or away is no evidence that
anything died. Every write is fenced by this leader's term (etcd.Fence).

Reading order: reconcile_once (one pass) -> _drive (one replica: _fail_without_image, _place, or
_look_after -> _serving / _without_endpoint) -> the actions (_start, _requeue, _remove, _set), each run
by _act as the replica's one task. What the controller remembers per replica between passes is one
ReplicaTrack (ReplicaTracker.forget drops it); everything else is read from etcd each pass.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import logging
import os
import time
from collections import defaultdict, deque
from typing import Any, Callable, Coroutine, TypeVar

from google.protobuf.message import Message

from clowder.controller.v1 import resources_pb2
from clowder.runtime.v1 import runtime_pb2
from clowder_common import keys, runtime_settings
from clowder_common.errors import AlreadyExists
from clowder_common.etcd import UNFENCED, AnsweringClock, EtcdState, Fence, LeadershipLost, PrefixCache
from clowder_common.tasks import cancel_and_wait, wait_event
from clowder_controller.caches import stop_caches
from clowder_controller.config import ControllerConfig
from clowder_controller.events import EventRecorder
from clowder_controller.images import record_digest
from clowder_controller.launcher import Launcher, RuntimeSpec, RuntimeState
from clowder_controller.scheduling.framework import Decision, NodeInfo, PlacementRequest
from clowder_controller.scheduling.memory import estimate_memory
from clowder_controller.scheduling.preemption import Placed, pick_victims
from clowder_controller.scheduling.profiles import build_scheduler
from clowder_controller.storage_client import StorageClients

log = logging.getLogger(__name__)

M = TypeVar("M", bound=Message)

ReplicaState = resources_pb2.ReplicaState
PENDING = resources_pb2.REPLICA_STATE_PENDING
PULLING = resources_pb2.REPLICA_STATE_PULLING
STARTING = resources_pb2.REPLICA_STATE_STARTING
READY = resources_pb2.REPLICA_STATE_READY
FAILED = resources_pb2.REPLICA_STATE_FAILED

MAX_BACKOFF_S = 30.0
# etcd round trips in flight at once: a burst (hundreds of replicas moving off lost nodes) queues here
# instead of timing out inside etcd and backing off for seconds.
ETCD_CONCURRENCY = 64
NO_NODE_MESSAGE = "waiting for a storage node to register"
# Replicas one rolling update may add above the wanted count (new ones get ready before old ones stop).
SURGE = 1
# How long a placement decided by this controller counts against its node before etcd shows it.
ASSUME_S = 5.0
# How often the reconciler looks for runtimes that exited (a look is a process poll or a cached pod phase).
EXIT_POLL_S = 1.0
# stop() waits this long for the replicas' actions to unwind after cancelling them.
STOP_ACTIONS_S = 10.0


def backoff_delay(failures: int) -> float:
    """0 s for the first retry, then 1, 2, 4 ... up to 30 s."""
    return 0.0 if failures <= 0 else min(2.0 ** (failures - 1), MAX_BACKOFF_S)


def template_hash(deployment: resources_pb2.Deployment) -> str:
    """What a replica runs, in 8 hex digits: a change of image or runtime settings means new replicas (rolling
    update). Settings enter only when set, so deployments without any keep the hash (and replicas) they had."""
    settings = runtime_settings.of_message(deployment)
    extra = "" if settings == runtime_settings.RuntimeSettings() else f"\0{settings}"
    return hashlib.sha256(f"{deployment.name}\0{deployment.image}{extra}".encode()).hexdigest()[:8]


def replica_id(template: str, slot: int) -> str:
    """Deterministic, so two reconcilers adding the same slot collide in etcd instead of duplicating it."""
    return f"{template}-{slot}"


def plan_rollout(wanted: int, template: str, replicas: list[resources_pb2.Replica]
                 ) -> tuple[list[int], list[resources_pb2.Replica]]:
    """Slots to create and replicas to remove for one deployment (scale and rolling update, surge 1).

    Old replicas (another template) stop only while enough ready replicas remain;
    unready old ones serve nobody and go first.
    """
    current = {r.slot: r for r in replicas if r.template_hash == template and r.id == replica_id(template, r.slot)}
    old = [r for r in replicas if current.get(r.slot) is not r]
    remove = [r for s, r in current.items() if s >= wanted]
    kept = [r for s, r in current.items() if s < wanted]
    missing = [s for s in range(wanted) if s not in current]
    if not old:
        return missing, remove
    budget = max(0, wanted + SURGE - len(kept) - len(old))
    create = missing[:budget]
    if wanted == 0:
        return create, remove + old
    ready = sum(1 for r in kept if r.state == READY) + sum(1 for r in old if r.state == READY)
    for r in sorted(old, key=lambda r: (r.state == READY, r.update_time.seconds)):
        if r.state != READY:
            remove.append(r)
        elif ready - 1 >= wanted:
            remove.append(r)
            ready -= 1
    return create, remove


ReplicaKey = tuple[str, str]


def key_of(replica: resources_pb2.Replica) -> ReplicaKey:
    return replica.deployment, replica.id


def _stamp(replica: resources_pb2.Replica) -> tuple[int, int]:
    return replica.update_time.seconds, replica.update_time.nanos


@dataclasses.dataclass
class ReplicaTrack:
    """What this controller remembers about one replica between passes; etcd holds everything else."""

    # The action running for it: one at a time, and a pass skips a replica that has one.
    action: asyncio.Task[None] | None = None
    # Failures in a row and the monotonic time before which a gated action may not start (backoff).
    failures: int = 0
    not_before: float = 0.0
    # update_time of our last write: a cached copy older than that is stale, and acting on it would redo
    # what was just done (start a runtime twice).
    written: tuple[int, int] = (0, 0)
    # The bytes we last wrote, for one-round-trip compare-and-put.
    last_bytes: bytes | None = None
    # A placement decided but not yet visible in the cache: (node, monotonic time of the decision).
    assumed: tuple[str, float] | None = None
    # Answering-clock time since which the started replica has had no endpoint in etcd.
    no_endpoint_since: float | None = None

    @property
    def busy(self) -> bool:
        return self.action is not None

    def gate_open(self) -> bool:
        return time.monotonic() >= self.not_before

    def failed(self) -> float:
        """One more failure in a row: back off for longer. Returns the delay now in force."""
        self.failures += 1
        delay = backoff_delay(self.failures)
        self.not_before = time.monotonic() + delay
        return delay


class ReplicaTracker:
    """Every ReplicaTrack, keyed by (deployment, replica id); `forget` is the one way to drop what is known."""

    def __init__(self) -> None:
        self._tracks: dict[ReplicaKey, ReplicaTrack] = {}

    def track(self, key: ReplicaKey) -> ReplicaTrack:
        """The replica's track, begun empty if there is none."""
        return self._tracks.setdefault(key, ReplicaTrack())

    def peek(self, key: ReplicaKey) -> ReplicaTrack | None:
        return self._tracks.get(key)

    def busy(self, key: ReplicaKey) -> bool:
        track = self._tracks.get(key)
        return track is not None and track.busy

    def gate_open(self, key: ReplicaKey) -> bool:
        track = self._tracks.get(key)
        return track is None or track.gate_open()

    def actions(self) -> list[asyncio.Task[None]]:
        return [t.action for t in self._tracks.values() if t.action is not None]

    def forget(self, key: ReplicaKey) -> None:
        """Drop everything known about the replica; an action still running for it stays registered (the
        replica stays busy) until the action ends."""
        track = self._tracks.pop(key, None)
        if track is not None and track.action is not None:
            self._tracks[key] = ReplicaTrack(action=track.action)

    def forget_all(self) -> None:
        for key in list(self._tracks):
            self.forget(key)

    def forget_gone(self, live: set[ReplicaKey]) -> None:
        """Forget replicas that etcd no longer has and nothing works on."""
        for key in [k for k, t in self._tracks.items() if k not in live and not t.busy]:
            del self._tracks[key]


@dataclasses.dataclass(frozen=True)
class PassView:
    """What one pass decides from: etcd's caches indexed for lookups, and the nodes with their placements."""

    images: dict[str, resources_pb2.Image]
    endpoints: dict[ReplicaKey, runtime_pb2.Endpoint]
    nodes: dict[str, NodeInfo]
    # Nodes that replicas sit on and that have been missing for the grace period (see _lost_nodes).
    lost_nodes: set[str]


class Reconciler:
    def __init__(self, state: EtcdState, storage: StorageClients, launcher: Launcher,
                 config: ControllerConfig, events: EventRecorder) -> None:
        self._state = state
        self._storage = storage
        self._launcher = launcher
        self._config = config
        self.events = events
        self.scheduler = build_scheduler(config.placement, config.locality_weight)
        self._wake = asyncio.Event()
        self._etcd_slots = asyncio.Semaphore(ETCD_CONCURRENCY)
        # Set per term by start(): every write compares the leader key this term created.
        self._fence: Fence = UNFENCED
        self._clock = AnsweringClock(state)
        # Answering-clock time at which a node referenced by replicas was first seen missing.
        self._absent: dict[str, float] = {}
        self._deployments = self._cache(keys.DEPLOYMENTS, resources_pb2.Deployment)
        self._replicas = self._cache(keys.REPLICAS, resources_pb2.Replica)
        self._nodes = self._cache(keys.NODES, resources_pb2.Node)
        self._endpoints = self._cache(keys.ENDPOINTS, runtime_pb2.Endpoint)
        self._images = self._cache(keys.IMAGES, resources_pb2.Image)
        self._caches: list[PrefixCache[Any]] = [self._deployments, self._replicas, self._nodes, self._endpoints,
                                                self._images]
        self._tracks = ReplicaTracker()
        # Replicas per node in the current pass, for preemption.
        self._placed: dict[str, list[Placed]] = defaultdict(list)
        # Scheduling decision times in seconds (the benchmark reads them).
        self.decision_seconds: deque[float] = deque(maxlen=100_000)
        self.last_pass_s = 0.0
        self._loop_task: asyncio.Task[None] | None = None
        self._exit_watch_task: asyncio.Task[None] | None = None

    def _cache(self, prefix: str, cls: type[M]) -> PrefixCache[M]:
        return PrefixCache(self._state, self._state.key(prefix), cls, on_change=self._wake.set)

    async def start(self, fence: Fence = UNFENCED) -> None:
        """Begin reconciling; `fence` is the elected term (UNFENCED only for tests and tools outside elections)."""
        self._fence = fence
        # First probe now, so the clock runs from the first pass.
        await self._clock.probe()
        self._clock.start()
        for cache in self._caches:
            await cache.start()
        self.events.start()
        self._loop_task = asyncio.create_task(self._run(), name="reconciler")
        self._exit_watch_task = asyncio.create_task(self._watch_exits(), name="reconciler exit watch")

    async def stop(self) -> None:
        """Stop reconciling; the runtimes keep running (a next term, here or elsewhere, finds them)."""
        await cancel_and_wait(self._exit_watch_task)
        self._exit_watch_task = None
        await cancel_and_wait(self._loop_task)
        self._loop_task = None
        tasks = self._tracks.actions()
        for task in tasks:
            task.cancel()
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=STOP_ACTIONS_S)
            if pending:
                log.warning("%d replica action(s) did not unwind within %.0fs", len(pending), STOP_ACTIONS_S)
        await stop_caches(self._caches)
        await self._clock.stop()
        # Another leader may write meanwhile: what we remember about our own writes is no longer evidence, and
        # a next term starts from etcd alone, as another controller elected instead would.
        self._tracks.forget_all()
        self._absent.clear()
        self._fence = UNFENCED
        await self.events.stop()

    async def _run(self) -> None:
        while True:
            # Not asyncio.wait_for: on Python 3.11 it can drop the cancellation stop() sends (a pass finishing
            # sets _wake at that moment), and this loop then ran forever (the bench-controller hang).
            await wait_event(self._wake, self._config.resync_interval_s)
            self._wake.clear()
            # Let a burst of etcd events settle into one pass; on a big cluster a pass costs real CPU, so
            # passes take at most about a third of the loop and the actions' etcd traffic keeps flowing.
            await asyncio.sleep(max(0.05, min(2.0, 2 * self.last_pass_s)))
            started = time.perf_counter()
            try:
                await self.reconcile_once()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("reconcile pass failed; the next pass retries")
            self.last_pass_s = time.perf_counter() - started

    async def _watch_exits(self) -> None:
        """Wake a pass as soon as a started runtime has exited, instead of at the next resync: a dead
        replica's requests are already continuing elsewhere, but its replacement should start now."""
        # Runtimes (replica key, pid) already reported: one that stays dead (its node within the lost-node
        # grace, or backing off) must not wake a pass every second.
        reported: set[tuple[str, str, int]] = set()
        while True:
            await asyncio.sleep(EXIT_POLL_S)
            exited = {(r.deployment, r.id, r.pid) for r in self._replicas.values()
                      if r.state in (STARTING, READY) and not self._tracks.busy(key_of(r))
                      and self._launcher.status(r).state is RuntimeState.EXITED}
            if exited - reported:
                self._wake.set()
            reported = exited

    # -- one pass ----------------------------------------------------------------

    async def reconcile_once(self) -> None:
        if not all(cache.ready for cache in self._caches):
            return
        deployments = {d.name: d for d in self._deployments.values()}
        images = {i.alias: i for i in self._images.values()}
        by_deployment: dict[str, list[resources_pb2.Replica]] = defaultdict(list)
        for replica in self._replicas.values():
            by_deployment[replica.deployment].append(replica)
        requests = {d.name: self._request(d, images.get(d.image)) for d in deployments.values()}
        view = PassView(
            images=images,
            endpoints={(e.deployment, e.replica_id): e for e in self._endpoints.values()},
            nodes=self._node_infos(requests, deployments),
            lost_nodes=self._lost_nodes(),
        )

        for name, replicas in by_deployment.items():
            if name not in deployments:
                for replica in replicas:
                    self._act(replica, self._remove(replica))

        # Higher priority first: its replicas take free room (or preempt) before lower ones can.
        for deployment in sorted(deployments.values(), key=lambda d: (-d.priority, d.name)):
            replicas = by_deployment.get(deployment.name, [])
            template = template_hash(deployment)
            create, remove = plan_rollout(deployment.replicas, template, replicas)
            for slot in create:
                self._act(self._new_replica(deployment, template, slot), self._create(deployment, template, slot))
            gone = {r.id for r in remove}
            for replica in remove:
                self._act(replica, self._remove(replica, record=True))
            for replica in replicas:
                if replica.id not in gone:
                    self._drive(view, deployment, replica, requests[deployment.name])
        self._tracks.forget_gone({key_of(r) for r in self._replicas.values()})

    def _lost_nodes(self) -> set[str]:
        """Nodes that replicas sit on and that have been missing for the grace period, timed while etcd answered."""
        now = self._clock.now()
        live = {n.name for n in self._nodes.values()}
        referenced = {r.node for r in self._replicas.values() if r.node}
        for name in [n for n in self._absent if n in live or n not in referenced]:
            del self._absent[name]
        lost = set()
        for name in referenced - live:
            if name not in self._absent:
                self._absent[name] = now
                log.warning("node %s is not registered; its replicas are left alone for %.0fs of etcd answering",
                            name, self._config.node_lost_grace_s)
            if now - self._absent[name] >= self._config.node_lost_grace_s:
                lost.add(name)
        return lost

    def _request(self, deployment: resources_pb2.Deployment,
                 image: resources_pb2.Image | None) -> PlacementRequest:
        return PlacementRequest(
            deployment=deployment.name,
            memory_bytes=(estimate_memory(image, deployment, self._config.runtime_settings) if image is not None
                          else deployment.memory_bytes),
            gpus=deployment.gpus,
            node_selector=dict(deployment.node_selector),
            digest=image.digest if image is not None else "",
        )

    def _node_infos(self, requests: dict[str, PlacementRequest],
                    deployments: dict[str, resources_pb2.Deployment]) -> dict[str, NodeInfo]:
        """Live nodes with what is placed on them: etcd's view plus placements still in flight."""
        self._placed = defaultdict(list)
        nodes = {n.name: NodeInfo(n, digests=set(n.blob_digests))
                 for n in sorted(self._nodes.values(), key=lambda n: n.name)}
        now = time.monotonic()
        empty = PlacementRequest(deployment="")
        for replica in self._replicas.values():
            node_name = replica.node
            track = self._tracks.peek(key_of(replica))
            if track is not None and track.assumed is not None:
                assumed_node, since = track.assumed
                if assumed_node == node_name or (not track.busy and now - since > ASSUME_S):
                    track.assumed = None
                else:
                    node_name = assumed_node
            info = nodes.get(node_name) if node_name else None
            if info is not None:
                request = requests.get(replica.deployment, empty)
                info.assign(request)
                owner = deployments.get(replica.deployment)
                self._placed[info.name].append(Placed(replica, request, owner.priority if owner else 0))
                if replica.image_digest:
                    info.digests.add(replica.image_digest)
        return nodes

    def _new_replica(self, deployment: resources_pb2.Deployment, template: str, slot: int) -> resources_pb2.Replica:
        return resources_pb2.Replica(id=replica_id(template, slot), deployment=deployment.name, state=PENDING,
                                     message="waiting for placement", slot=slot, template_hash=template)

    async def _create(self, deployment: resources_pb2.Deployment, template: str, slot: int) -> None:
        replica = self._new_replica(deployment, template, slot)
        replica.update_time.GetCurrentTime()
        try:
            async with self._etcd_slots:
                await self._state.create(self._state.key(keys.replica(deployment.name, replica.id)), replica,
                                         fence=self._fence)
        except AlreadyExists:
            return  # another reconciler (or an earlier pass) added this slot: nothing to do
        log.info("replica %s/%s created", deployment.name, replica.id)

    # -- one replica: each step decides, and at most one action runs per replica ---------------------------

    def _drive(self, view: PassView, deployment: resources_pb2.Deployment, replica: resources_pb2.Replica,
               request: PlacementRequest) -> None:
        """Decide the next action for one replica: fail it (no image), place it (no node, or its node is lost),
        or look after it on its node."""
        track = self._tracks.peek(key_of(replica))
        if track is not None and (track.busy or _stamp(replica) < track.written):
            return  # an action is running, or the watch has not delivered our last write yet
        image = view.images.get(deployment.image)
        if image is None:
            self._fail_without_image(deployment, replica)
            return
        info = view.nodes.get(replica.node) if replica.node else None
        if info is not None:
            self._look_after(view, deployment, replica, image, info.node)
        elif not replica.node or replica.node in view.lost_nodes:
            self._place(view, deployment, replica, image, request)
        # Else its node is missing but not yet lost (etcd blip, lease re-registering): leave it running.

    def _fail_without_image(self, deployment: resources_pb2.Deployment, replica: resources_pb2.Replica) -> None:
        message = f"image {deployment.image!r} does not exist"
        if replica.state != FAILED or replica.message != message:
            self._act(replica, self._set(replica, FAILED, message))

    def _place(self, view: PassView, deployment: resources_pb2.Deployment, replica: resources_pb2.Replica,
               image: resources_pb2.Image, request: PlacementRequest) -> None:
        """Schedule a replica without a (live) node, preempting lower priorities if it has one; start it there."""
        key = key_of(replica)
        lost = replica.node
        started = time.perf_counter()
        decision = self.scheduler.schedule(request, list(view.nodes.values()))
        self.decision_seconds.append(time.perf_counter() - started)
        if decision.node is None and deployment.priority > 0 and self._tracks.gate_open(key):
            decision = self._preempt(deployment, request, view.nodes) or decision
        if decision.node is None:
            reason = NO_NODE_MESSAGE if not view.nodes else decision.reason
            if replica.state != PENDING or replica.node or replica.message != reason:
                self.events.record(deployment.name, "unschedulable", reason, replica.id)
                self._act(replica, self._requeue(replica, reason))
            return
        if not self._tracks.gate_open(key):
            return
        chosen = decision.node
        chosen.assign(request)
        self._tracks.track(key).assumed = (chosen.name, time.monotonic())
        if lost:
            self.events.record(deployment.name, "rescheduled", f"node {lost} lost; placed on {chosen.name}",
                               replica.id)
        else:
            self.events.record(deployment.name, "scheduled", f"placed on {chosen.name}", replica.id)
        restart = f"node {lost} was lost" if lost else None
        self._act(replica, self._start(deployment, replica, chosen.node, image, restart_reason=restart))

    def _look_after(self, view: PassView, deployment: resources_pb2.Deployment, replica: resources_pb2.Replica,
                    image: resources_pb2.Image, node: resources_pb2.Node) -> None:
        """A replica on a live node: (re)start it, or follow its runtime to ready by the endpoint in etcd."""
        key = key_of(replica)
        if replica.state in (PENDING, PULLING, FAILED):
            if (track := self._tracks.peek(key)) is not None:
                track.no_endpoint_since = None
            # Nothing is working on it (not busy): begin, or retry after backoff.
            self._act(replica, self._start(deployment, replica, node, image), gated=True)
            return
        status = self._launcher.status(replica)
        if status.state is RuntimeState.EXITED:
            why = "runtime exited" + (f" with code {status.exit_code}" if status.exit_code is not None else "")
            self._act(replica, self._start(deployment, replica, node, image, restart_reason=why), gated=True)
            return
        endpoint = view.endpoints.get(key)
        if endpoint is not None:
            self._serving(deployment, replica, endpoint)
        else:
            self._without_endpoint(deployment, replica, image, node)

    def _serving(self, deployment: resources_pb2.Deployment, replica: resources_pb2.Replica,
                 endpoint: runtime_pb2.Endpoint) -> None:
        track = self._tracks.peek(key_of(replica))
        if track is not None:
            track.no_endpoint_since = None
        if replica.state != READY or replica.endpoint != endpoint.address:
            if track is not None:
                track.failures = 0
            if replica.state != READY:
                self.events.record(deployment.name, "ready", f"serving at {endpoint.address}", replica.id)
            self._act(replica, self._set(replica, READY, "serving", endpoint=endpoint.address))

    def _without_endpoint(self, deployment: resources_pb2.Deployment, replica: resources_pb2.Replica,
                          image: resources_pb2.Image, node: resources_pb2.Node) -> None:
        """The process runs but etcd has no endpoint: timed on the answering clock, so an etcd outage (which
        expires every endpoint lease) neither marks the replica unready nor restarts its runtime; the runtime
        registers again by itself once etcd answers."""
        track = self._tracks.track(key_of(replica))
        now = self._clock.now()
        if track.no_endpoint_since is None:
            track.no_endpoint_since = now
        missing_s = now - track.no_endpoint_since
        if replica.state == READY:
            if missing_s >= self._config.node_lost_grace_s:
                self._act(replica, self._set(replica, STARTING, "endpoint lease lost; waiting for the runtime"))
        elif missing_s > self._config.runtime_start_timeout_s:
            self._act(replica, self._start(deployment, replica, node, image,
                                           restart_reason="runtime did not become ready in time"), gated=True)

    def _preempt(self, deployment: resources_pb2.Deployment, request: PlacementRequest,
                 nodes: dict[str, NodeInfo]) -> Decision | None:
        """Evict lower-priority replicas (not busy ones: their action would race the eviction) to make room."""
        placed = {name: [p for p in items if not self._tracks.busy(key_of(p.replica))]
                  for name, items in self._placed.items()}
        found = pick_victims(request, deployment.priority, list(nodes.values()), placed)
        if found is None:
            return None
        node, victims = found
        for victim in victims:
            v = victim.replica
            why = f"preempted by {deployment.name} (priority {deployment.priority} > {victim.priority})"
            self.events.record(v.deployment, "preempted", f"evicted from {node.name}: {why}", v.id)
            node.release(victim.request)
            self._placed[node.name].remove(victim)
            self._act(v, self._requeue(v, why))
        return Decision(node, "", 0.0)

    def _act(self, replica: resources_pb2.Replica, action: Coroutine[Any, Any, None], gated: bool = False) -> None:
        """Run `action` for the replica unless one runs already (or, gated, while it backs off)."""
        track = self._tracks.track(key_of(replica))
        if track.busy or (gated and not track.gate_open()):
            action.close()
            return
        track.action = asyncio.create_task(self._guard(replica, action),
                                           name=f"replica {replica.deployment}/{replica.id}")

    async def _guard(self, replica: resources_pb2.Replica, action: Coroutine[Any, Any, None]) -> None:
        key = key_of(replica)
        try:
            await action
        except asyncio.CancelledError:
            raise
        except LeadershipLost as exc:
            # Deposed: nothing may be written, not even the failure; the elector steps down.
            log.warning("replica %s/%s: %s", replica.deployment, replica.id, exc)
        except Exception as exc:
            delay = self._tracks.track(key).failed()
            message = str(exc) or type(exc).__name__
            log.warning("replica %s/%s failed (%s); retrying in %.0fs", replica.deployment, replica.id, message,
                        delay)
            self.events.record(replica.deployment, "failed", message, replica.id)
            with contextlib.suppress(Exception):
                await self._write(replica, lambda r: _set_state(r, FAILED, message))
        finally:
            if (track := self._tracks.peek(key)) is not None:
                track.action = None
            self._wake.set()

    # -- actions -------------------------------------------------------------------

    async def _write(self, replica: resources_pb2.Replica,
                     mutate: Callable[[resources_pb2.Replica], None]) -> resources_pb2.Replica | None:
        """Read-modify-write on the replica's key; None if the replica is gone.

        One round trip when our copy is current: the write compares the stored bytes with what we last wrote
        (or the cached copy) and, when they differ, comes back with the stored value to retry on.
        """
        track = self._tracks.track(key_of(replica))
        etcd_key = self._state.key(keys.replica(replica.deployment, replica.id))
        base = track.last_bytes or replica.SerializeToString()
        for _ in range(5):
            updated = resources_pb2.Replica.FromString(base)
            mutate(updated)
            updated.update_time.GetCurrentTime()
            data = updated.SerializeToString()
            async with self._etcd_slots:
                swap = await self._state.compare_and_put(etcd_key, data, expect_value=base, fence=self._fence)
            if swap.done:
                track.last_bytes = data
                track.written = _stamp(updated)
                return updated
            if swap.current is None:
                track.last_bytes = None
                return None
            base = swap.current.data
        raise RuntimeError(f"replica {replica.id} kept changing under the reconciler")

    async def _set(self, replica: resources_pb2.Replica, state: ReplicaState, message: str,
                   endpoint: str | None = None) -> None:
        def mutate(r: resources_pb2.Replica) -> None:
            _set_state(r, state, message)
            if endpoint is not None:
                r.endpoint = endpoint

        await self._write(replica, mutate)

    async def _release_pin(self, replica: resources_pb2.Replica) -> None:
        """The runtime is gone: its blobs may be collected again once nothing else pins them."""
        node = next((n for n in self._nodes.values() if n.name == replica.node), None) if replica.node else None
        if node is None:
            return  # a lost node's store is not reachable; its pins go with it
        try:
            await self._storage.unpin(node.storage_address, pin_holder(replica))
        except Exception as exc:  # never block removing a replica on its node's storage
            log.warning("unpinning %s on %s failed: %s", pin_holder(replica), node.name, exc)

    async def _check_fence(self) -> None:
        """Before stopping a process (which no transaction can undo): are we still this term's leader?"""
        async with self._etcd_slots:
            held = await self._state.holds(self._fence)
        if not held:
            raise LeadershipLost(f"leadership ({self._fence.key}) was lost; not stopping a runtime")

    async def _requeue(self, replica: resources_pb2.Replica, message: str) -> None:
        await self._check_fence()
        await self._launcher.stop(replica, self._config.runtime_stop_grace_s)
        await self._release_pin(replica)

        def mutate(r: resources_pb2.Replica) -> None:
            _set_state(r, PENDING, message)
            r.node, r.endpoint, r.pid = "", "", 0

        await self._write(replica, mutate)

    async def _start(self, deployment: resources_pb2.Deployment, replica: resources_pb2.Replica,
                     node: resources_pb2.Node, image: resources_pb2.Image, restart_reason: str | None = None) -> None:
        """Pull the image onto the node (a no-op when present), then (re)start the runtime."""
        key = key_of(replica)
        if restart_reason:
            await self._check_fence()
            log.warning("replica %s/%s: %s; starting it again", deployment.name, replica.id, restart_reason)
            await self._launcher.stop(replica, self._config.runtime_stop_grace_s)
            # The stopped runtime's endpoint outlives it until its lease expires: gone now, so the next
            # pass cannot take it for the new runtime's and call the replica ready at a dead address.
            await self._state.delete(self._state.key(keys.endpoint(replica.deployment, replica.id)),
                                     fence=self._fence)
            self._tracks.track(key).failed()

        def pulling(r: resources_pb2.Replica) -> None:
            _set_state(r, PULLING, f"pulling {image.alias} onto {node.name}")
            r.node, r.endpoint = node.name, ""

        if await self._write(replica, pulling) is None:
            return
        self.events.record(deployment.name, "pulling", f"pulling {image.alias} onto {node.name}", replica.id)
        blob = None
        async for message in self._storage.pull_image(node.storage_address, image):
            if message.HasField("blob"):
                blob = message.blob
        if blob is None:
            raise RuntimeError("storage ended the pull without a blob")
        await self._storage.pin(node.storage_address, pin_holder(replica), image.alias)
        if image.digest != blob.digest or image.size_bytes != blob.size_bytes:
            await record_digest(self._state, image.alias, blob.digest, blob.size_bytes)
        settings = runtime_settings.resolve(deployment, image.configuration, self._config.runtime_settings)
        spec = RuntimeSpec(
            deployment=deployment.name,
            replica_id=replica.id,
            node=node.name,
            digest=blob.digest,
            storage_address=node.storage_address,
            configuration=image.configuration,
            threads=settings.threads or self._threads_for(node),
            slots=settings.slots,
            context_size=settings.context_size,
            batch_size=settings.batch_size,
            # No setting fixes the threads: the runtime follows the runtimes on its node (a replica started
            # alone would otherwise keep every core after a second one joins it); _threads_for only starts it.
            node_cpus=0 if settings.threads else (node.cpus or os.cpu_count() or 1),
        )
        pid = await self._launcher.start(spec)
        self._tracks.track(key).no_endpoint_since = None
        stored = blob

        def started(r: resources_pb2.Replica) -> None:
            _set_state(r, STARTING, f"runtime started (pid {pid})" + (f" after: {restart_reason}"
                                                                      if restart_reason else ""))
            r.pid, r.image_digest = pid, stored.digest
            if restart_reason:
                r.restarts += 1

        await self._write(replica, started)
        self.events.record(deployment.name, "started", f"runtime started on {node.name}", replica.id)

    def _threads_for(self, node: resources_pb2.Node) -> int:
        """Share the node's cores among its replicas: oversubscribed llama.cpp threads stall each other."""
        cores = node.cpus or os.cpu_count() or 1
        on_node = sum(1 for r in self._replicas.values() if r.node == node.name) or 1
        return max(1, cores // on_node)

    async def _remove(self, replica: resources_pb2.Replica, record: bool = False) -> None:
        await self._check_fence()
        await self._launcher.stop(replica, self._config.runtime_stop_grace_s)
        await self._release_pin(replica)
        async with self._etcd_slots:
            await self._state.delete(self._state.key(keys.replica(replica.deployment, replica.id)), fence=self._fence)
        self._tracks.forget(key_of(replica))
        if record:
            self.events.record(replica.deployment, "stopped", "replica removed", replica.id)
        log.info("replica %s/%s removed", replica.deployment, replica.id)


def pin_holder(replica: resources_pb2.Replica) -> str:
    return f"{replica.deployment}/{replica.id}"


def _set_state(replica: resources_pb2.Replica, state: ReplicaState, message: str) -> None:
    replica.state = state
    replica.message = message
