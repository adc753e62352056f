"""Assemble the controller: control-plane gRPC API on every replica; reconciler and autoscaler on the leader."""

from __future__ import annotations

import logging
import pathlib

from clowder.controller.v1 import controller_pb2, controller_pb2_grpc
from clowder_common.etcd import EtcdState, Fence
from clowder_common.grpc_server import create_grpc_server
from clowder_common.security import NO_SECURITY, ClusterSecurity, child_environment, load_security
from clowder_controller.adapters import AdapterSync, adapter_registrar
from clowder_controller.autoscaler import Autoscaler, Windows
from clowder_controller.config import ControllerConfig
from clowder_controller.deployments import DeploymentServicer
from clowder_controller.images import ImageServicer
from clowder_controller.kubernetes_launcher import KubernetesLauncher, kubernetes_settings
from clowder_controller.events import EventRecorder
from clowder_controller.launcher import Launcher, LocalProcessLauncher
from clowder_controller.leader import LeaderElector, new_identity
from clowder_controller.nodes import NodeServicer
from clowder_controller.reconciler import Reconciler
from clowder_controller.revisions import ServingServicer
from clowder_controller.rollout import RolloutDriver
from clowder_controller.storage_client import StorageClients

log = logging.getLogger(__name__)


def _service_name(name: str) -> str:
    return controller_pb2.DESCRIPTOR.services_by_name[name].full_name


def default_launcher(config: ControllerConfig, admin_token: str, security: ClusterSecurity = NO_SECURITY) -> Launcher:
    if config.launcher == "kubernetes":
        from kubernetes import client
        from kubernetes import config as kube_config

        try:
            kube_config.load_incluster_config()
        except kube_config.ConfigException:
            kube_config.load_kube_config()
        return KubernetesLauncher(client.ApiClient(), kubernetes_settings(config), config.etcd_endpoints,
                                  config.etcd_prefix)
    if config.launcher != "local":
        raise ValueError(f"launcher must be 'local' or 'kubernetes', not {config.launcher!r}")
    return LocalProcessLauncher(config.etcd_endpoints, config.etcd_prefix, config.runtime_listen,
                                pathlib.Path(config.data_dir) / "logs", admin_token, config.node_exec,
                                child_env=child_environment(config, security))


class ControllerApp:
    def __init__(self, config: ControllerConfig, admin_token: str, launcher: Launcher | None = None) -> None:
        self.config = config
        # The credential and TLS material runtimes and storage demand of the cluster's components.
        self.security = load_security(config)
        self.state = EtcdState(config.etcd_endpoints, config.etcd_prefix, self.security.etcd_tls)
        self.storage = StorageClients(admin_token, self.security)
        self.launcher = launcher or default_launcher(config, admin_token, self.security)
        self.events = EventRecorder(self.state)
        self.reconciler = Reconciler(self.state, self.storage, self.launcher, config, self.events)
        self.autoscaler = Autoscaler(self.state, self.events, config.autoscale_interval_s,
                                     Windows(config.scale_up_window_s, config.scale_down_window_s))
        self.rollouts = RolloutDriver(self.state)
        self.adapter_sync = AdapterSync(self.state, admin_token, self.security)
        self.identity = new_identity()

        def images(server):
            controller_pb2_grpc.add_ImageServiceServicer_to_server(ImageServicer(self.state, self.storage), server)
            return _service_name("ImageService")

        deployment_servicer = DeploymentServicer(self.state, config.max_replicas)

        def deployments(server):
            controller_pb2_grpc.add_DeploymentServiceServicer_to_server(deployment_servicer, server)
            return _service_name("DeploymentService")

        def services(server):
            controller_pb2_grpc.add_ServingServiceServicer_to_server(
                ServingServicer(self.state, deployment_servicer), server)
            return _service_name("ServingService")

        def nodes(server):
            controller_pb2_grpc.add_NodeServiceServicer_to_server(NodeServicer(self.state), server)
            return _service_name("NodeService")

        adapters = adapter_registrar(self.state)
        self.grpc = create_grpc_server(config.listen, [images, deployments, nodes, services, adapters], admin_token=admin_token,
                                       tls=self.security.tls)
        self.port = self.grpc.port
        # Campaigns from start() on, publishing the address of the port bound above.
        self.elector = LeaderElector(self.state, self.identity, config.listen.rsplit(":", 1)[0] + f":{self.port}",
                                     config.leader_ttl_s, self._lead, self._follow)
        self._stopped = False

    async def start(self) -> None:
        await self.state.connect()
        if isinstance(self.launcher, KubernetesLauncher):
            await self.launcher.start_watching()
        await self.grpc.start()
        self.elector.start()
        log.info("serving on %s", self.config.listen.rsplit(":", 1)[0] + f":{self.port}")

    @property
    def is_leader(self) -> bool:
        return self.elector.is_leader

    async def _lead(self, fence: Fence) -> None:
        await self.reconciler.start(fence)
        await self.autoscaler.start(fence)
        await self.rollouts.start(fence)
        await self.adapter_sync.start(fence)

    async def _follow(self) -> None:
        await self.adapter_sync.stop()
        await self.rollouts.stop()
        await self.autoscaler.stop()
        await self.reconciler.stop()

    async def stop(self) -> None:
        """Drain the API, hand leadership on, stop the runtimes this controller launched."""
        if self._stopped:
            return
        self._stopped = True
        await self.grpc.stop(grace=5)
        # Never started (start() failed early): stepping down finds nothing to release.
        await self.elector.stop()
        await self.launcher.stop_all(self.config.runtime_stop_grace_s)
        await self.storage.close()
        await self.state.close()


async def create_controller(config: ControllerConfig, admin_token: str,
                            launcher: Launcher | None = None) -> ControllerApp:
    if not admin_token:
        raise ValueError("the controller needs an admin token")
    return ControllerApp(config, admin_token, launcher)
