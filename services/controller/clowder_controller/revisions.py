"""Services: numbered revisions of one model name (services/<name>), their traffic split, and ServingService.

A revision is the deployment template one `serve up|update` applied. The first revision, and every rolling
update, runs as the deployment named like the service (what `serve up` made before revisions existed); a
revision that runs beside another (canary, fixed split) gets a deployment of its own, <service>-r<number>.
Balancers route the service's name by the `traffic` weights (traffic_split.py); the leader's RolloutDriver
(rollout.py) advances or rolls back canaries and keeps the revisions' deployments in line with the record.
"""

from __future__ import annotations

import bisect
import logging
import time

from clowder.controller.v1 import controller_pb2, controller_pb2_grpc, resources_pb2
from clowder_common import keys
from clowder_common.errors import Aborted, AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from clowder_common.etcd import UNFENCED, EtcdState, Fence, Versioned
from clowder_common.keys import validate_name
from clowder_controller.deployments import DeploymentServicer
from clowder_controller.events import events_key, new_event

log = logging.getLogger(__name__)

SERVICES = keys.SERVICES
# Per-revision counters each balancer publishes (RevisionTrafficReport), under its lease.
REVSTATS = keys.REVSTATS
MAX_SERVICE_EVENTS = 20
CAS_ATTEMPTS = 5
DEFAULT_STEPS = (10, 50, 100)
DEFAULT_INTERVAL_S = 60.0
DEFAULT_MAX_ERROR_RATE = 0.05
DEFAULT_MAX_TTFT_RATIO = 1.5
# The template fields a rolling update writes onto the live deployment (runtime settings unset in the
# template are cleared there, as `serve update` always did).
ROLLED_FIELDS = ["replicas", "image", "slots", "threads", "context_size", "batch_size"]

STABLE = resources_pb2.ROLLOUT_STATE_STABLE
PROGRESSING = resources_pb2.ROLLOUT_STATE_PROGRESSING
FIXED = resources_pb2.ROLLOUT_STATE_FIXED
ROLLED_BACK = resources_pb2.ROLLOUT_STATE_ROLLED_BACK
CANARY = resources_pb2.ROLLOUT_STRATEGY_CANARY


def service_key(name: str) -> str:
    return keys.service(name)


def revision_deployment(service: str, number: int) -> str:
    """The deployment of a revision that runs beside another; within the 63 characters a name may have."""
    return f"{service[:56]}-r{number}"


def state_name(state: int) -> str:
    return resources_pb2.RolloutState.Name(state).removeprefix("ROLLOUT_STATE_").lower()


# -- templates and policies ------------------------------------------------------------------------------


def template_of(deployment: resources_pb2.Deployment, name: str = "") -> resources_pb2.Deployment:
    """What a revision runs: the deployment without its output fields (and named `name`)."""
    out = resources_pb2.Deployment()
    out.CopyFrom(deployment)
    for field in ("ready_replicas", "create_time", "update_time", "events"):
        out.ClearField(field)
    out.name = name
    return out


def same_template(a: resources_pb2.Deployment, b: resources_pb2.Deployment) -> bool:
    return (template_of(a).SerializeToString(deterministic=True)
            == template_of(b).SerializeToString(deterministic=True))


def describe_change(before: resources_pb2.Deployment, after: resources_pb2.Deployment) -> str:
    what = []
    for field in ("image", "replicas", "slots", "threads", "context_size", "batch_size"):
        old, new = getattr(before, field), getattr(after, field)
        if old != new:
            what.append(f"{field} {old or '-'} -> {new or '-'}")
    return ", ".join(what) or "settings changed"


def normalized_policy(policy: resources_pb2.RolloutPolicy) -> resources_pb2.RolloutPolicy:
    """The policy with its defaults filled in; InvalidArgument naming the field for a bad one."""
    out = resources_pb2.RolloutPolicy()
    out.CopyFrom(policy)
    if out.strategy == resources_pb2.ROLLOUT_STRATEGY_UNSPECIFIED:
        out.strategy = resources_pb2.ROLLOUT_STRATEGY_ROLLING
    steps = list(out.steps) or list(DEFAULT_STEPS)
    for i, step in enumerate(steps):
        if not 1 <= step <= 100:
            raise InvalidArgument(f"rollout.steps[{i}] must be a percent between 1 and 100, got {step}",
                                  field=f"rollout.steps[{i}]")
        if i and step <= steps[i - 1]:
            raise InvalidArgument("rollout.steps must increase", field=f"rollout.steps[{i}]")
    if steps[-1] != 100:
        steps.append(100)
    del out.steps[:]
    out.steps.extend(steps)
    if out.interval_s < 0:
        raise InvalidArgument("rollout.interval must not be negative", field="rollout.interval")
    out.interval_s = out.interval_s or DEFAULT_INTERVAL_S
    if not 0 <= out.max_error_rate <= 1:
        raise InvalidArgument("rollout.maxErrorRate must be between 0 and 1", field="rollout.maxErrorRate")
    out.max_error_rate = out.max_error_rate or DEFAULT_MAX_ERROR_RATE
    if out.max_ttft_ratio < 0:
        raise InvalidArgument("rollout.maxTtftRatio must not be negative", field="rollout.maxTtftRatio")
    out.max_ttft_ratio = out.max_ttft_ratio or DEFAULT_MAX_TTFT_RATIO
    return out


# -- the record -------------------------------------------------------------------------------------------


def find_revision(service: resources_pb2.Service, number: int) -> resources_pb2.Revision | None:
    return next((r for r in service.revisions if r.number == number), None)


def known_revision(service: resources_pb2.Service, number: int) -> resources_pb2.Revision:
    found = find_revision(service, number)
    if found is None:
        raise NotFound(f"service {service.name!r} has no revision {number} (revisions: "
                       f"{', '.join(str(r.number) for r in service.revisions)})", reason="REVISION_NOT_FOUND",
                       metadata={"service": service.name, "revision": str(number)})
    return found


def live_revisions(service: resources_pb2.Service) -> set[int]:
    """Revisions whose deployment must run: the stable one, the candidate, and any with traffic."""
    live = {t.revision for t in service.traffic if t.percent > 0}
    live.add(service.rollout.stable_revision)
    if service.rollout.candidate_revision:
        live.add(service.rollout.candidate_revision)
    return live - {0}


def live_deployments(service: resources_pb2.Service) -> dict[str, resources_pb2.Revision]:
    """Deployment name -> the live revision it runs."""
    out = {}
    for number in sorted(live_revisions(service)):
        revision = find_revision(service, number)
        if revision is not None:
            out[revision.deployment] = revision
    return out


def retired_deployments(service: resources_pb2.Service) -> set[str]:
    """Deployments the service made for revisions that run no more."""
    return {r.deployment for r in service.revisions} - set(live_deployments(service))


def add_event(service: resources_pb2.Service, reason: str, message: str) -> None:
    log.info("service %s %s: %s", service.name, reason, message)
    service.events.append(new_event(reason, message))
    del service.events[:-MAX_SERVICE_EVENTS]


def set_stable(service: resources_pb2.Service, number: int, state: resources_pb2.RolloutState,
               message: str) -> None:
    """All traffic to revision `number`, nothing in progress."""
    del service.traffic[:]
    service.traffic.add(revision=number, percent=100)
    rollout = service.rollout
    rollout.state, rollout.stable_revision, rollout.candidate_revision, rollout.step = state, number, 0, 0
    rollout.ClearField("step_start_time")
    rollout.message = message


def split(service: resources_pb2.Service, candidate_percent: int) -> None:
    rollout = service.rollout
    del service.traffic[:]
    service.traffic.add(revision=rollout.stable_revision, percent=100 - candidate_percent)
    service.traffic.add(revision=rollout.candidate_revision, percent=candidate_percent)


def promote(service: resources_pb2.Service, why: str, totals: dict) -> None:
    candidate = service.rollout.candidate_revision
    before = service.rollout.stable_revision
    set_stable(service, candidate, STABLE, f"revision {candidate} promoted: {why}")
    set_baseline(service, totals)
    add_event(service, "promoted", f"all traffic to revision {candidate} (was {before}): {why}")


def roll_back(service: resources_pb2.Service, why: str, totals: dict) -> None:
    candidate = service.rollout.candidate_revision
    stable = service.rollout.stable_revision
    set_stable(service, stable, ROLLED_BACK, f"revision {candidate} rolled back: {why}")
    set_baseline(service, totals)
    add_event(service, "rolled-back", f"all traffic to revision {stable}, revision {candidate} removed: {why}")


def touch(service: resources_pb2.Service) -> None:
    service.update_time.GetCurrentTime()


# -- metrics ----------------------------------------------------------------------------------------------


Totals = dict[tuple[str, int], resources_pb2.RevisionCounters]


def sum_reports(reports: list[resources_pb2.RevisionTrafficReport]) -> Totals:
    """Counters per (service, revision) summed over balancers."""
    totals: dict[tuple[str, int], resources_pb2.RevisionCounters] = {}
    for report in reports:
        for c in report.revisions:
            key = (c.service, c.revision)
            total = totals.get(key)
            if total is None:
                total = totals[key] = resources_pb2.RevisionCounters(service=c.service, revision=c.revision)
                total.ttft_bounds.extend(c.ttft_bounds)
                total.ttft_buckets.extend([0] * len(c.ttft_bounds))
            total.requests += c.requests
            total.errors += c.errors
            total.ttft_count += c.ttft_count
            if list(c.ttft_bounds) == list(total.ttft_bounds):
                for i, n in enumerate(c.ttft_buckets):
                    total.ttft_buckets[i] += n
    return totals


def since(now: resources_pb2.RevisionCounters, base: resources_pb2.RevisionCounters | None
          ) -> resources_pb2.RevisionCounters:
    """What happened between `base` and `now`; a balancer that restarted (counters went down) starts afresh."""
    if base is None or now.requests < base.requests or now.ttft_count < base.ttft_count or \
            list(now.ttft_bounds) != list(base.ttft_bounds):
        return now
    out = resources_pb2.RevisionCounters(service=now.service, revision=now.revision,
                                         requests=now.requests - base.requests,
                                         errors=max(0, now.errors - base.errors),
                                         ttft_count=now.ttft_count - base.ttft_count)
    out.ttft_bounds.extend(now.ttft_bounds)
    out.ttft_buckets.extend(max(0, a - b) for a, b in zip(now.ttft_buckets, base.ttft_buckets))
    return out


def quantile(counters: resources_pb2.RevisionCounters, q: float = 0.95) -> float:
    """Prometheus' histogram_quantile: linear within the bucket the rank falls in; 0 without observations."""
    count = counters.ttft_count
    if not count or not counters.ttft_bounds:
        return 0.0
    rank = q * count
    buckets = list(counters.ttft_buckets)
    i = bisect.bisect_left(buckets, rank)
    bounds = list(counters.ttft_bounds)
    if i >= len(bounds):
        return bounds[-1]  # beyond the largest finite bound: that bound is all we can say
    lower = bounds[i - 1] if i else 0.0
    below = buckets[i - 1] if i else 0
    inside = buckets[i] - below
    return lower + (bounds[i] - lower) * ((rank - below) / inside if inside else 1.0)


def window(service: resources_pb2.Service, totals: dict[tuple[str, int], resources_pb2.RevisionCounters],
           number: int) -> resources_pb2.RevisionCounters:
    """Revision `number`'s counters since the rollout's baseline."""
    now = totals.get((service.name, number)) or resources_pb2.RevisionCounters(service=service.name,
                                                                              revision=number)
    base = next((b for b in service.rollout.baseline if b.revision == number), None)
    return since(now, base)


def set_baseline(service: resources_pb2.Service,
                 totals: dict[tuple[str, int], resources_pb2.RevisionCounters]) -> None:
    """The window of the limits (and of `status`'s rates) starts now."""
    rollout = service.rollout
    del rollout.baseline[:]
    rollout.baseline.extend(c for (name, _), c in sorted(totals.items()) if name == service.name)
    rollout.baseline_time.GetCurrentTime()


def window_metrics(service: resources_pb2.Service,
                   totals: Totals) -> list[resources_pb2.RevisionMetrics]:
    rollout = service.rollout
    started = rollout.baseline_time.ToNanoseconds() / 1e9 if rollout.HasField("baseline_time") else 0.0
    seconds = max(1e-3, time.time() - started) if started else 0.0
    out = []
    for number in sorted(live_revisions(service)):
        c = window(service, totals, number)
        out.append(resources_pb2.RevisionMetrics(
            revision=number, requests=c.requests, errors=c.errors,
            request_rate=c.requests / seconds if seconds else 0.0,
            error_rate=c.errors / c.requests if c.requests else 0.0,
            p95_ttft_s=quantile(c), window_s=seconds))
    return out


async def read_totals(state: EtcdState) -> dict[tuple[str, int], resources_pb2.RevisionCounters]:
    items, _ = await state.list(state.key(REVSTATS), resources_pb2.RevisionTrafficReport)
    return sum_reports([i.value for i in items])


# -- deployments the record owns -------------------------------------------------------------------------


async def create_deployment(state: EtcdState, template: resources_pb2.Deployment, fence: Fence = UNFENCED) -> None:
    """A deployment from a revision's template (the leader re-creates one a crash left missing)."""
    deployment = template_of(template, template.name)
    deployment.create_time.GetCurrentTime()
    deployment.update_time.CopyFrom(deployment.create_time)
    try:
        await state.create(state.key(keys.deployment(deployment.name)), deployment, fence=fence)
    except AlreadyExists:
        pass


async def delete_deployment(state: EtcdState, name: str, fence: Fence = UNFENCED) -> bool:
    """Remove a retired revision's deployment (the reconciler stops its replicas); False if it was gone."""
    gone = await state.delete(state.key(keys.deployment(name)), fence=fence)
    await state.delete(state.key(events_key(name)), fence=fence)
    if gone:
        log.info("deployment %s of a retired revision deleted", name)
    return gone


# -- the API ----------------------------------------------------------------------------------------------


class ServingServicer(controller_pb2_grpc.ServingServiceServicer):
    """Every controller serves it; writes compare on the record's mod_revision (the leader's driver too)."""

    def __init__(self, state: EtcdState, deployments: DeploymentServicer) -> None:
        self._state = state
        # Deployment writes go through the DeploymentService's own checks (image exists, runtime settings).
        self._deployments = deployments

    def _key(self, name: str) -> str:
        return self._state.key(service_key(name))

    async def _get(self, name: str) -> Versioned[resources_pb2.Service]:
        found = await self._state.get(self._key(name), resources_pb2.Service)
        if found is None:
            raise NotFound(f"service {name!r} not found", reason="SERVICE_NOT_FOUND", metadata={"service": name})
        return found

    async def _save(self, current: Versioned[resources_pb2.Service] | None, service: resources_pb2.Service) -> bool:
        touch(service)
        if current is None:
            try:
                await self._state.create(self._key(service.name), service)
            except AlreadyExists:
                return False
            return True
        return await self._state.update(current.key, service, current.mod_revision)

    async def _retire(self, service: resources_pb2.Service) -> None:
        for name in sorted(retired_deployments(service)):
            await delete_deployment(self._state, name)

    async def _deployment(self, name: str) -> resources_pb2.Deployment | None:
        found = await self._state.get(self._state.key(keys.deployment(name)), resources_pb2.Deployment)
        return found.value if found is not None else None

    async def _create(self, template: resources_pb2.Deployment) -> None:
        request = controller_pb2.CreateDeploymentRequest(deployment=template_of(template, template.name))
        try:
            await self._deployments.CreateDeployment(request, None)
        except AlreadyExists:
            # Never taken over: it may be anyone's (or left by an apply that died before writing the record).
            raise FailedPrecondition(
                f"deployment {template.name!r} already exists and runs no revision of this service; remove it "
                f"(`clowder undeploy {template.name}`) and apply again", reason="DEPLOYMENT_EXISTS",
                metadata={"deployment": template.name}) from None

    async def _roll(self, deployment: str, template: resources_pb2.Deployment) -> None:
        wanted = template_of(template, deployment)
        request = controller_pb2.UpdateDeploymentRequest(deployment=wanted)
        request.update_mask.paths.extend(ROLLED_FIELDS)
        await self._deployments.UpdateDeployment(request, None)

    async def ApplyService(self, request, context):
        template = template_of(request.template, request.template.name)
        name = validate_name(template.name, "template.name")
        if not template.image:
            raise InvalidArgument("template.image is required", field="template.image")
        policy = normalized_policy(request.rollout)
        weight = request.weight if request.HasField("weight") else None
        if weight is not None and weight > 100:
            raise InvalidArgument(f"weight must be a percent between 0 and 100, got {weight}", field="weight")
        for _ in range(CAS_ATTEMPTS):
            current = await self._state.get(self._key(name), resources_pb2.Service)
            if current is None:
                service = await self._adopt_or_new(name, template, policy, weight, request.spec)
                if service is None:  # created revision 1
                    created = await self._get(name)
                    return controller_pb2.ApplyServiceResponse(service=created.value, changed=True, revision=1)
            else:
                service = resources_pb2.Service()
                service.CopyFrom(current.value)
            result = await self._apply(current, service, template, policy, weight, request.spec)
            if result is not None:
                return result
        raise Aborted(f"service {name!r} kept changing; try again", retry_after=0.5)

    async def _adopt_or_new(self, name, template, policy, weight, spec) -> resources_pb2.Service | None:
        """No record yet: revision 1 from a deployment `serve up` made before revisions existed (returned, to
        apply the template on), or a new service (created here; None)."""
        existing = await self._deployment(name)
        service = resources_pb2.Service(name=name)
        service.create_time.GetCurrentTime()
        service.rollout.policy.CopyFrom(policy)
        first = service.revisions.add(number=1, deployment=name, spec=spec if existing is None else "")
        first.create_time.GetCurrentTime()
        if existing is not None:
            first.template.CopyFrom(template_of(existing, name))
            first.change = "adopted the deployment made before revisions"
            set_stable(service, 1, STABLE, "revision 1 serves all traffic")
            return service
        if weight is not None:
            raise FailedPrecondition(f"service {name!r} does not exist yet: a split needs a second revision "
                                     "(create it with `clowder serve up -f FILE`)", reason="ONE_REVISION")
        first.template.CopyFrom(template_of(template, name))
        first.change = "created"
        set_stable(service, 1, STABLE, "revision 1 serves all traffic")
        set_baseline(service, await read_totals(self._state))
        add_event(service, "created", f"revision 1: {template.replicas} replica(s) of {template.image}")
        await self._create(first.template)
        if not await self._save(None, service):
            raise Aborted(f"service {name!r} was created concurrently; try again", retry_after=0.5)
        return None

    async def _apply(self, current, service: resources_pb2.Service, template, policy, weight, spec):
        """One attempt on `service` (read at `current`); None when the record changed under us."""
        name = service.name
        rollout = service.rollout
        if rollout.candidate_revision:
            candidate = known_revision(service, rollout.candidate_revision)
            if same_template(template, candidate.template) and weight is None:
                return controller_pb2.ApplyServiceResponse(service=service, changed=False)
            raise FailedPrecondition(
                f"service {name!r} is moving to revision {rollout.candidate_revision} ({state_name(rollout.state)}); "
                "`clowder serve promote` or `clowder serve rollback` it first", reason="ROLLOUT_IN_PROGRESS")
        stable = known_revision(service, rollout.stable_revision)
        if same_template(template, stable.template):
            if weight is not None:
                raise FailedPrecondition(
                    f"service {name!r} has one revision serving ({stable.number}) and the spec matches it: a split "
                    "needs a changed spec (a new revision)", reason="ONE_REVISION")
            if current is not None and rollout.policy == policy:
                return controller_pb2.ApplyServiceResponse(service=service, changed=False)
            rollout.policy.CopyFrom(policy)  # the rollout settings apply to the next update
            if await self._save(current, service):
                return controller_pb2.ApplyServiceResponse(service=service, changed=current is None)
            return None
        number = max(r.number for r in service.revisions) + 1
        new = service.revisions.add(number=number, spec=spec, change=describe_change(stable.template, template))
        new.create_time.GetCurrentTime()
        rollout.policy.CopyFrom(policy)
        if weight is None and policy.strategy != CANARY:
            # Rolling (today's `serve update`): the live deployment rolls over in place.
            new.deployment = stable.deployment
            new.template.CopyFrom(template_of(template, stable.deployment))
            await self._roll(stable.deployment, new.template)
            set_stable(service, number, STABLE, f"rolled to revision {number}")
            set_baseline(service, await read_totals(self._state))
            add_event(service, "rolled", f"revision {number} rolls over deployment {stable.deployment}: {new.change}")
        else:
            new.deployment = revision_deployment(name, number)
            new.template.CopyFrom(template_of(template, new.deployment))
            await self._create(new.template)
            rollout.candidate_revision, rollout.step = number, 0
            rollout.ClearField("step_start_time")
            rollout.start_time.GetCurrentTime()
            if weight is not None:
                rollout.state = FIXED
                split(service, weight)
                set_baseline(service, await read_totals(self._state))
                rollout.message = f"fixed split: {weight}% to revision {number}"
                add_event(service, "split", f"revision {number} takes {weight}% ({new.change})")
            else:
                rollout.state = PROGRESSING
                split(service, 0)
                rollout.message = f"waiting for revision {number} to be ready"
                add_event(service, "rollout", f"canary of revision {number} begins ({new.change}); steps "
                          f"{list(policy.steps)} every {policy.interval_s:g}s")
        if not await self._save(current, service):
            if new.deployment != stable.deployment:
                # Made for this attempt only: the next attempt decides afresh on the record as it is now.
                await delete_deployment(self._state, new.deployment)
            return None
        await self._retire(service)
        return controller_pb2.ApplyServiceResponse(service=service, changed=True, revision=number)

    async def GetService(self, request, context):
        found = await self._get(request.name)
        service = resources_pb2.Service()
        service.CopyFrom(found.value)
        service.metrics.extend(window_metrics(service, await read_totals(self._state)))
        return controller_pb2.GetServiceResponse(service=service)

    async def ListServices(self, request, context):
        items, _ = await self._state.list(self._state.key(SERVICES), resources_pb2.Service)
        return controller_pb2.ListServicesResponse(services=[i.value for i in items])

    async def _change(self, name: str, mutate) -> resources_pb2.Service:
        """Read, mutate (it raises for bad input, before anything is written), write with compare-and-swap."""
        for _ in range(CAS_ATTEMPTS):
            current = await self._get(name)
            service = resources_pb2.Service()
            service.CopyFrom(current.value)
            await mutate(service)
            if await self._save(current, service):
                await self._retire(service)
                return service
        raise Aborted(f"service {name!r} kept changing; try again", retry_after=0.5)

    async def PromoteService(self, request, context):
        async def mutate(service: resources_pb2.Service) -> None:
            if not service.rollout.candidate_revision:
                raise FailedPrecondition(
                    f"service {service.name!r} has one revision serving ({service.rollout.stable_revision}): "
                    "nothing to promote", reason="ONE_REVISION")
            promote(service, "by hand", await read_totals(self._state))

        return controller_pb2.PromoteServiceResponse(service=await self._change(request.name, mutate))

    async def RollbackService(self, request, context):
        async def mutate(service: resources_pb2.Service) -> None:
            rollout = service.rollout
            wanted = request.revision
            if wanted:
                known_revision(service, wanted)
            if rollout.candidate_revision:
                if wanted not in (0, rollout.stable_revision):
                    raise FailedPrecondition(
                        f"service {service.name!r} is moving to revision {rollout.candidate_revision}: roll that "
                        f"back first (to revision {rollout.stable_revision})", reason="ROLLOUT_IN_PROGRESS")
                roll_back(service, "by hand", await read_totals(self._state))
                return
            stable = known_revision(service, rollout.stable_revision)
            if not wanted:
                older = [r.number for r in service.revisions if r.number < stable.number]
                if not older:
                    raise FailedPrecondition(f"service {service.name!r} has one revision: nothing to roll back to",
                                             reason="ONE_REVISION")
                wanted = max(older)
            if wanted == stable.number:
                raise FailedPrecondition(f"service {service.name!r} already serves revision {wanted}",
                                         field="revision")
            target = known_revision(service, wanted)
            # An older revision comes back on the live deployment, rolled over in place.
            target.deployment = stable.deployment
            target.template.name = stable.deployment
            await self._roll(stable.deployment, target.template)
            set_stable(service, wanted, ROLLED_BACK, f"rolled back from revision {stable.number} to {wanted} by hand")
            set_baseline(service, await read_totals(self._state))
            add_event(service, "rolled-back", f"revision {wanted} rolls over deployment {stable.deployment} "
                      f"(was revision {stable.number}), by hand")

        return controller_pb2.RollbackServiceResponse(service=await self._change(request.name, mutate))

    async def SetServiceTraffic(self, request, context):
        if not request.traffic:
            raise InvalidArgument("traffic must name at least one revision", field="traffic")
        total = sum(t.percent for t in request.traffic)
        numbers = [t.revision for t in request.traffic]
        if len(set(numbers)) != len(numbers):
            raise InvalidArgument("traffic names a revision twice", field="traffic")
        if total != 100:
            raise InvalidArgument(f"traffic percents add up to {total}, not 100", field="traffic")

        async def mutate(service: resources_pb2.Service) -> None:
            rollout = service.rollout
            running = {rollout.stable_revision, rollout.candidate_revision} - {0}
            for number in numbers:
                known_revision(service, number)
                if number not in running:
                    raise FailedPrecondition(
                        f"revision {number} of service {service.name!r} is not running (running: "
                        f"{sorted(running)}); `clowder serve rollback --to {number}` brings it back",
                        reason="REVISION_NOT_RUNNING")
            del service.traffic[:]
            service.traffic.extend(t for t in request.traffic)
            if rollout.candidate_revision:
                rollout.state = FIXED
                set_baseline(service, await read_totals(self._state))
            rollout.message = "split set by hand: " + ", ".join(f"revision {t.revision} {t.percent}%"
                                                                 for t in request.traffic)
            add_event(service, "split", rollout.message)

        return controller_pb2.SetServiceTrafficResponse(service=await self._change(request.name, mutate))

    async def DeleteService(self, request, context):
        found = await self._get(request.name)
        await self._state.delete(found.key)
        for name in sorted({r.deployment for r in found.value.revisions}):
            await delete_deployment(self._state, name)
        log.info("service %s deleted", request.name)
        return controller_pb2.DeleteServiceResponse()
