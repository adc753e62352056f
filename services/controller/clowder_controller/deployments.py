"""DeploymentService: the desired replica counts the reconciler works towards."""

from __future__ import annotations

import logging
from collections.abc import Iterable

from clowder.controller.v1 import controller_pb2, controller_pb2_grpc, resources_pb2
from clowder_common import keys
from clowder_common.errors import Aborted, InvalidArgument, NotFound
from clowder_common.etcd import EtcdState
from clowder_common.keys import validate_name
from clowder_controller.autoscaler import is_autoscaled
from clowder_controller.events import events_key, read_all_events, read_events
from clowder_controller.images import get_image, largest_node_cpus
from clowder_controller.pagination import paginate
from clowder_controller.validation import validate_deployment, validate_replicas

log = logging.getLogger(__name__)

# Read-modify-write attempts before telling the client about a concurrent change.
CAS_ATTEMPTS = 5
# Fields an update_mask may name.
UPDATABLE = ("replicas", "image", "node_selector", "memory_bytes", "gpus", "min_replicas", "max_replicas",
             "target_in_flight", "scale_to_zero_after_s", "priority", "slots", "threads", "context_size",
             "batch_size")
# Optional (proto3 presence) fields: an update that names one the request leaves unset clears it.
_OPTIONAL = frozenset(f.name for f in resources_pb2.Deployment.DESCRIPTOR.fields if f.has_presence
                      and f.message_type is None)


async def list_replicas(state: EtcdState, deployment: str) -> list[resources_pb2.Replica]:
    prefix = keys.REPLICAS if deployment in ("", "-") else keys.replicas_of(deployment)
    items, _ = await state.list(state.key(prefix), resources_pb2.Replica)
    return [i.value for i in items]


def with_status(deployment: resources_pb2.Deployment, replicas: list[resources_pb2.Replica],
                events: Iterable[resources_pb2.DeploymentEvent] = ()):
    out = resources_pb2.Deployment()
    out.CopyFrom(deployment)
    out.events.extend(events)
    out.ready_replicas = sum(
        1 for r in replicas if r.deployment == deployment.name and r.state == resources_pb2.REPLICA_STATE_READY
    )
    return out


class DeploymentServicer(controller_pb2_grpc.DeploymentServiceServicer):
    def __init__(self, state: EtcdState, max_replicas: int) -> None:
        self._state = state
        self._max_replicas = max_replicas

    async def _get(self, name: str):
        found = await self._state.get(self._state.key(keys.deployment(name)), resources_pb2.Deployment)
        if found is None:
            raise NotFound(f"deployment {name!r} not found", reason="DEPLOYMENT_NOT_FOUND",
                           metadata={"deployment": name})
        return found

    async def CreateDeployment(self, request, context):
        deployment = resources_pb2.Deployment()
        deployment.CopyFrom(request.deployment)
        if not deployment.name:
            deployment.name = deployment.image
        validate_name(deployment.name, "deployment.name")
        validate_name(deployment.image, "deployment.image")
        image = await get_image(self._state, deployment.image)
        validate_deployment(deployment, self._max_replicas, image.value, await largest_node_cpus(self._state))
        if is_autoscaled(deployment):
            deployment.replicas = min(max(deployment.replicas, deployment.min_replicas), deployment.max_replicas)
        deployment.ready_replicas = 0
        deployment.ClearField("events")
        deployment.create_time.GetCurrentTime()
        deployment.update_time.CopyFrom(deployment.create_time)
        await self._state.create(self._state.key(keys.deployment(deployment.name)), deployment)
        log.info("deployment %s created: image %s, %d replicas", deployment.name, deployment.image,
                 deployment.replicas)
        return controller_pb2.CreateDeploymentResponse(deployment=deployment)

    async def GetDeployment(self, request, context):
        found = await self._get(request.name)
        replicas = await list_replicas(self._state, request.name)
        events = await read_events(self._state, request.name)
        return controller_pb2.GetDeploymentResponse(deployment=with_status(found.value, replicas, events))

    async def ListDeployments(self, request, context):
        items, _ = await self._state.list(self._state.key(keys.DEPLOYMENTS), resources_pb2.Deployment)
        replicas = await list_replicas(self._state, "-")
        events = await read_all_events(self._state)
        # Only the latest event per deployment: `clowder ps` shows it, `describe` asks for the rest.
        page, token = paginate([(i.value.name, with_status(i.value, replicas, events.get(i.value.name, [])[-1:]))
                                for i in items],
                               request.page_size, request.page_token)
        return controller_pb2.ListDeploymentsResponse(deployments=page, next_page_token=token)

    async def UpdateDeployment(self, request, context):
        wanted = request.deployment
        paths = list(request.update_mask.paths) if request.HasField("update_mask") else None
        if paths is not None:
            unknown = [p for p in paths if p not in UPDATABLE]
            if unknown:
                raise InvalidArgument(f"update_mask names fields that cannot be updated: {', '.join(unknown)}",
                                      field="update_mask")
        else:
            paths = ["replicas"] + (["image"] if wanted.image else [])
        if "replicas" in paths:
            validate_replicas(wanted.replicas, self._max_replicas)
        if "image" in paths:
            validate_name(wanted.image, "deployment.image")
            await get_image(self._state, wanted.image)
        # Threads are checked against the nodes only when they change: nodes come and go, and a scale must not
        # fail because the biggest node left since the threads were set.
        node_cpus = await largest_node_cpus(self._state) if "threads" in paths else 0
        for _ in range(CAS_ATTEMPTS):
            current = await self._get(wanted.name)
            updated = resources_pb2.Deployment()
            updated.CopyFrom(current.value)
            for path in paths:
                if path == "node_selector":
                    updated.node_selector.clear()
                    updated.node_selector.update(wanted.node_selector)
                elif path in _OPTIONAL and not wanted.HasField(path):
                    updated.ClearField(path)
                else:
                    setattr(updated, path, getattr(wanted, path))
            image = await get_image(self._state, updated.image)
            validate_deployment(updated, self._max_replicas, image.value, node_cpus)
            updated.update_time.GetCurrentTime()
            if await self._state.update(current.key, updated, current.mod_revision):
                log.info("deployment %s updated (%s): image %s, %d replicas", updated.name, ",".join(paths),
                         updated.image, updated.replicas)
                replicas = await list_replicas(self._state, updated.name)
                return controller_pb2.UpdateDeploymentResponse(deployment=with_status(updated, replicas))
        raise Aborted(f"deployment {wanted.name!r} kept changing; try again", retry_after=0.5)

    async def DeleteDeployment(self, request, context):
        found = await self._get(request.name)
        # The reconciler sees the deployment gone and stops its replicas.
        await self._state.delete(found.key)
        await self._state.delete(self._state.key(events_key(request.name)))
        log.info("deployment %s deleted", request.name)
        return controller_pb2.DeleteDeploymentResponse()

    async def ListReplicas(self, request, context):
        if request.deployment not in ("", "-"):
            await self._get(request.deployment)
        return controller_pb2.ListReplicasResponse(replicas=await list_replicas(self._state, request.deployment))
