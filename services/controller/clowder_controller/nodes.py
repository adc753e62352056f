"""NodeService: the nodes whose storage services hold a lease in etcd."""

from __future__ import annotations

from clowder.controller.v1 import controller_pb2, controller_pb2_grpc, resources_pb2
from clowder_common import keys
from clowder_common.errors import NotFound
from clowder_common.etcd import EtcdState


class NodeServicer(controller_pb2_grpc.NodeServiceServicer):
    def __init__(self, state: EtcdState) -> None:
        self._state = state

    async def ListNodes(self, request, context):
        items, _ = await self._state.list(self._state.key(keys.NODES), resources_pb2.Node)
        return controller_pb2.ListNodesResponse(nodes=[i.value for i in items])

    async def GetNode(self, request, context):
        found = await self._state.get(self._state.key(keys.node(request.name)), resources_pb2.Node)
        if found is None:
            raise NotFound(f"node {request.name!r} is not registered", reason="NODE_NOT_FOUND",
                           metadata={"node": request.name})
        return controller_pb2.GetNodeResponse(node=found.value)
