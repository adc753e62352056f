"""Assembles the balancer: etcd discovery, the routing core, and its HTTP and gRPC faces."""

from __future__ import annotations

import asyncio
import logging

from aiohttp import web

from clowder_common.etcd import EtcdState
from clowder_common.grpc_server import GrpcServer, create_grpc_server

from clowder_balancer.channels import ChannelPool
from clowder_balancer.config import BalancerConfig, split_host_port
from clowder_balancer.discovery import Discovery
from clowder_balancer.grpc_api import InferenceServicer
from clowder_balancer.http_api import HttpApi
from clowder_balancer.metrics import Metrics
from clowder_balancer.picker import Picker
from clowder_balancer.router import Router

log = logging.getLogger(__name__)


class BalancerApp:
    """The running balancer; `http_port` and `grpc_port` are the bound ports once started."""

    def __init__(self, config: BalancerConfig, picker: Picker | None = None) -> None:
        self.config = config
        self.state = EtcdState(config.etcd_endpoints, config.etcd_prefix)
        self.metrics = Metrics()
        self.channels = ChannelPool()
        self.discovery = Discovery(self.state, on_endpoints_change=self._endpoints_changed)
        self.router = Router(config, self.discovery, self.channels, self.metrics, picker)
        self._http_host, self._http_port_wanted = split_host_port(config.http_listen, "http_listen")
        self._http = HttpApi(self.router, self.discovery, self.metrics, config.max_body_bytes)
        self._servicer = InferenceServicer(self.router, self.discovery, self.metrics)
        self._runner: web.AppRunner | None = None
        self._grpc: GrpcServer | None = None
        self.http_port = 0
        self.grpc_port = 0
        self._stop_task: asyncio.Task | None = None

    def _endpoints_changed(self) -> None:
        self.channels.sync(self.discovery.addresses())

    async def start(self) -> None:
        try:
            await self._start()
        except BaseException:
            await self.stop()
            raise

    async def _start(self) -> None:
        await self.state.connect()
        # Serve even if the caches are not loaded yet: /healthz says 503 and requests get UNAVAILABLE
        # until they are, which beats refusing connections while etcd is slow.
        await self.discovery.start()
        self._grpc = create_grpc_server(self.config.grpc_listen, [self._servicer.register])
        await self._grpc.start()
        self.grpc_port = self._grpc.port
        # handler_cancellation: a client that hangs up cancels its handler, and so its runtime call.
        self._runner = web.AppRunner(
            self._http.application(),
            handler_cancellation=True,
            shutdown_timeout=self.config.drain_grace_s,
            access_log=None,
        )
        await self._runner.setup()
        site = web.TCPSite(self._runner, self._http_host, self._http_port_wanted)
        await site.start()
        self.http_port = self._runner.addresses[0][1]
        log.info("serving on %s:%d (http; grpc on port %d)", self._http_host, self.http_port, self.grpc_port)

    async def stop(self) -> None:
        """Stop accepting, let in-flight streams finish within drain_grace_s, then close everything.

        Safe to call more than once, also concurrently.
        """
        if self._stop_task is None:
            self._stop_task = asyncio.ensure_future(self._stop())
        await asyncio.shield(self._stop_task)

    async def _stop(self) -> None:
        grace = self.config.drain_grace_s
        stops = []
        if self._grpc is not None:
            stops.append(self._grpc.stop(grace))
        if self._runner is not None:
            stops.append(self._runner.cleanup())
        results = await asyncio.gather(*stops, return_exceptions=True)
        for result in results:
            if isinstance(result, Exception):
                log.warning("error while draining: %s", result)
        await self.channels.close()
        await self.discovery.stop()
        await self.state.close()
        log.info("stopped")


async def create_balancer(config: BalancerConfig, picker: Picker | None = None) -> BalancerApp:
    """Build the balancer (nothing listens until `start()`)."""
    return BalancerApp(config, picker)
