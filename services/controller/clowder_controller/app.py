"""Assemble the controller: control-plane gRPC API, reconciler and launcher."""

from __future__ import annotations

import logging
import pathlib

from clowder.controller.v1 import controller_pb2, controller_pb2_grpc
from clowder_common.etcd import EtcdState
from clowder_common.grpc_server import create_grpc_server
from clowder_controller.config import ControllerConfig
from clowder_controller.deployments import DeploymentServicer
from clowder_controller.images import ImageServicer
from clowder_controller.launcher import Launcher, LocalProcessLauncher
from clowder_controller.nodes import NodeServicer
from clowder_controller.reconciler import Reconciler
from clowder_controller.storage_client import StorageClients

log = logging.getLogger(__name__)


def _service_name(name: str) -> str:
    return controller_pb2.DESCRIPTOR.services_by_name[name].full_name


class ControllerApp:
    def __init__(self, config: ControllerConfig, admin_token: str, launcher: Launcher | None = None) -> None:
        self.config = config
        self.state = EtcdState(config.etcd_endpoints, config.etcd_prefix)
        self.storage = StorageClients(admin_token)
        self.launcher = launcher or LocalProcessLauncher(
            config.etcd_endpoints, config.etcd_prefix, config.runtime_listen,
            pathlib.Path(config.data_dir) / "logs", admin_token,
        )
        self.reconciler = Reconciler(self.state, self.storage, self.launcher, config)

        def images(server):
            controller_pb2_grpc.add_ImageServiceServicer_to_server(ImageServicer(self.state, self.storage), server)
            return _service_name("ImageService")

        def deployments(server):
            controller_pb2_grpc.add_DeploymentServiceServicer_to_server(
                DeploymentServicer(self.state, config.max_replicas), server)
            return _service_name("DeploymentService")

        def nodes(server):
            controller_pb2_grpc.add_NodeServiceServicer_to_server(NodeServicer(self.state), server)
            return _service_name("NodeService")

        self.grpc = create_grpc_server(config.listen, [images, deployments, nodes], admin_token=admin_token)
        self.port = self.grpc.port
        self._stopped = False

    async def start(self) -> None:
        await self.state.connect()
        await self.grpc.start()
        await self.reconciler.start()
        log.info("serving on %s", self.config.listen.rsplit(":", 1)[0] + f":{self.port}")

    async def stop(self) -> None:
        """Drain the API, stop reconciling, stop the runtimes this controller launched."""
        if self._stopped:
            return
        self._stopped = True
        await self.grpc.stop(grace=5)
        await self.reconciler.stop()
        await self.launcher.stop_all(self.config.runtime_stop_grace_s)
        await self.storage.close()
        await self.state.close()


async def create_controller(config: ControllerConfig, admin_token: str,
                            launcher: Launcher | None = None) -> ControllerApp:
    if not admin_token:
        raise ValueError("the controller needs an admin token")
    return ControllerApp(config, admin_token, launcher)
