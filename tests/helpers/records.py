"""The etcd records tests write (a deployment, a runtime's endpoint, as the controller and runtime do) and read."""

from __future__ import annotations

from clowder.controller.v1 import resources_pb2
from clowder.runtime.v1 import runtime_pb2
from clowder_common import keys
from clowder_common.etcd import EtcdState


async def put_deployment(state: EtcdState, name: str, replicas: int = 1) -> None:
    await state.put(state.key(keys.deployment(name)), resources_pb2.Deployment(name=name, image=name, replicas=replicas))


async def put_endpoint(state: EtcdState, deployment: str, replica_id: str, address: str) -> None:
    endpoint = runtime_pb2.Endpoint(deployment=deployment, replica_id=replica_id, address=address, node="local")
    await state.put(state.key(keys.endpoint(deployment, replica_id)), endpoint)


async def replicas_of(state: EtcdState, deployment: str) -> list[resources_pb2.Replica]:
    """The deployment's replica records as they are in etcd now."""
    items, _ = await state.list(state.key(keys.replicas_of(deployment)), resources_pb2.Replica)
    return [i.value for i in items]
