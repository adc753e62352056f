"""The rollout driver, run by the leader: canary steps, automatic rollback, and revisions' deployments kept in
line with the service records.

Everything it knows comes from etcd (services/, revstats/, deployments/, replicas/), so a new leader (or this
one restarted) picks a rollout up where the record says it is: the step, when the step began, and the counters
its window started from. Every write is fenced by the leader's term.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from clowder.controller.v1 import resources_pb2
from clowder_common import keys
from clowder_common.etcd import UNFENCED, EtcdState, Fence, LeadershipLost, PrefixCache
from clowder_common.tasks import cancel_and_wait, run_periodically
from clowder_controller.caches import stop_caches
from clowder_controller import revisions
from clowder_controller.revisions import PROGRESSING, find_revision

log = logging.getLogger(__name__)

# Requests the candidate needs in a step before its error rate is judged (at any moment of the step: a broken
# revision goes as soon as this many requests show it).
MIN_REQUESTS = 5
# First tokens each revision needs before the p95 ratio is judged, at the end of a step only: a p95 of a few
# samples is their maximum, and a replica's first requests are slow while its caches are cold.
MIN_TTFT_SAMPLES = 20
# A candidate that is not ready this long after the rollout began is rolled back (at least; see _deadline).
READY_DEADLINE_S = 300.0


def ready_deadline(policy: resources_pb2.RolloutPolicy) -> float:
    return max(READY_DEADLINE_S, 5 * policy.interval_s)


def judge(service: resources_pb2.Service, totals, step_done: bool = True) -> str:
    """Why the candidate breaks a limit in the current window; empty when it does not. The time to first token is
    judged only once the step is done (`step_done`), on the whole step."""
    rollout = service.rollout
    policy = rollout.policy
    candidate = revisions.window(service, totals, rollout.candidate_revision)
    if candidate.requests >= MIN_REQUESTS:
        rate = candidate.errors / candidate.requests
        if rate > policy.max_error_rate:
            return (f"error rate {rate:.0%} of revision {rollout.candidate_revision} ({candidate.errors} of "
                    f"{candidate.requests} requests) is above {policy.max_error_rate:.0%}")
    if not step_done:
        return ""
    stable = revisions.window(service, totals, rollout.stable_revision)
    if candidate.ttft_count >= MIN_TTFT_SAMPLES and stable.ttft_count >= MIN_TTFT_SAMPLES:
        mine, theirs = revisions.quantile(candidate), revisions.quantile(stable)
        if theirs > 0 and mine / theirs > policy.max_ttft_ratio:
            return (f"p95 time to first token of revision {rollout.candidate_revision} ({mine:.3f}s) is "
                    f"{mine / theirs:.2f}x the stable revision's ({theirs:.3f}s), above {policy.max_ttft_ratio:g}x")
    return ""


class RolloutDriver:
    def __init__(self, state: EtcdState, interval_s: float = 1.0) -> None:
        self._state = state
        self._interval = interval_s
        self._wake = asyncio.Event()
        self._services = PrefixCache(state, state.key(revisions.SERVICES), resources_pb2.Service,
                                     on_change=self._wake.set)
        self._reports = PrefixCache(state, state.key(revisions.REVSTATS), resources_pb2.RevisionTrafficReport)
        self._deployments = PrefixCache(state, state.key(keys.DEPLOYMENTS), resources_pb2.Deployment,
                                        on_change=self._wake.set)
        self._replicas = PrefixCache(state, state.key(keys.REPLICAS), resources_pb2.Replica, on_change=self._wake.set)
        self._caches: list[PrefixCache[Any]] = [self._services, self._reports, self._deployments, self._replicas]
        self._fence: Fence = UNFENCED
        self._task: asyncio.Task | None = None

    async def start(self, fence: Fence = UNFENCED) -> None:
        self._fence = fence
        for cache in self._caches:
            await cache.start()
        self._task = asyncio.create_task(run_periodically(self.drive_once, self._interval, self._wake, "rollout pass"),
                                         name="rollout")

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None
        await stop_caches(self._caches)
        self._fence = UNFENCED

    async def drive_once(self) -> None:
        if not all(cache.ready for cache in self._caches):
            return
        totals = revisions.sum_reports(self._reports.values())
        for key, service in list(self._services.items.items()):
            try:
                await self._drive(key, service, totals)
            except LeadershipLost:
                raise
            except Exception as exc:
                log.warning("rollout of service %s: %s; the next pass tries again", service.name, exc)

    async def _drive(self, key: str, service: resources_pb2.Service, totals) -> None:
        await self._keep_deployments(key, service)
        if service.rollout.state != PROGRESSING or not service.rollout.candidate_revision:
            return
        updated = resources_pb2.Service()
        updated.CopyFrom(service)
        if self._step(updated, totals):
            revisions.touch(updated)
            current = await self._state.get(key, resources_pb2.Service)
            if current is None or current.value != service:
                return  # changed meanwhile (promote by hand, a new apply): decide again on what it is now
            if await self._state.update(key, updated, current.mod_revision, fence=self._fence):
                await self._keep_deployments(key, updated)

    async def _keep_deployments(self, key: str, service: resources_pb2.Service) -> None:
        """Live revisions have their deployment (a crash between two writes may have left one missing); retired
        ones have none."""
        present = {d.name for d in self._deployments.values()}
        for name, revision in revisions.live_deployments(service).items():
            if name not in present:
                # The two caches watch apart: a deployment the API just removed (promote, delete) may be gone here
                # while the record here is older. Only the record as etcd has it now may bring one back.
                fresh = await self._state.get(key, resources_pb2.Service)
                if fresh is None or name not in revisions.live_deployments(fresh.value):
                    continue
                log.warning("service %s: deployment %s of live revision %d is missing; creating it", service.name,
                            name, revision.number)
                await revisions.create_deployment(self._state, revision.template, fence=self._fence)
        for name in sorted(revisions.retired_deployments(service) & present):
            await revisions.delete_deployment(self._state, name, fence=self._fence)

    def _step(self, service: resources_pb2.Service, totals) -> bool:
        """Move the rollout on (mutating `service`); True when it changed."""
        rollout = service.rollout
        policy = rollout.policy
        number = rollout.candidate_revision
        candidate = find_revision(service, number)
        if candidate is None:
            revisions.roll_back(service, f"revision {number} is not in the record", totals)
            return True
        replicas = [r for r in self._replicas.values() if r.deployment == candidate.deployment]
        failed = next((r for r in replicas if r.state == resources_pb2.REPLICA_STATE_FAILED or r.restarts > 0), None)
        if failed is not None:
            why = failed.message or "its runtime exited"
            revisions.roll_back(service, f"revision {number} failed: replica {failed.id}: {why}", totals)
            return True
        ready = sum(1 for r in replicas if r.state == resources_pb2.REPLICA_STATE_READY)
        now = time.time()
        if not rollout.HasField("step_start_time"):
            wanted = max(1, candidate.template.replicas)
            if ready >= wanted:
                self._begin_step(service, 0, totals)
                return True
            began = rollout.start_time.ToNanoseconds() / 1e9 if rollout.HasField("start_time") else now
            if now - began > ready_deadline(policy):
                revisions.roll_back(service, f"revision {number} was not ready after {now - began:.0f}s "
                                             f"({ready}/{wanted} replicas)", totals)
                return True
            return False
        if ready == 0:
            revisions.roll_back(service, f"revision {number} has no ready replica", totals)
            return True
        step_done = now - rollout.step_start_time.ToNanoseconds() / 1e9 >= policy.interval_s
        broken = judge(service, totals, step_done)
        if broken:
            revisions.roll_back(service, broken, totals)
            return True
        if not step_done:
            return False
        following = rollout.step + 1
        if following >= len(policy.steps) or policy.steps[following] >= 100:
            revisions.promote(service, f"{len(policy.steps) - 1} step(s) passed within the limits", totals)
            return True
        self._begin_step(service, following, totals)
        return True

    def _begin_step(self, service: resources_pb2.Service, step: int, totals) -> None:
        rollout = service.rollout
        percent = rollout.policy.steps[step]
        rollout.step = step
        rollout.step_start_time.GetCurrentTime()
        revisions.split(service, percent)
        revisions.set_baseline(service, totals)
        rollout.message = (f"step {step + 1}/{len(rollout.policy.steps)}: {percent}% to revision "
                           f"{rollout.candidate_revision}")
        revisions.add_event(service, "step", rollout.message)
