"""Assembles the balancer: etcd discovery, the routing core, and its HTTP and gRPC faces."""

from __future__ import annotations

import asyncio
import logging

from aiohttp import web

from clowder_common.etcd import EtcdState
from clowder_common.grpc_server import GrpcServer, create_grpc_server
from clowder_common.security import load_security

from clowder_balancer.apikeys import ApiKeyServicer, ApiKeyStore
from clowder_balancer.batch.feature import Batches
from clowder_balancer.batch.service import BatchSettings
from clowder_balancer.channels import ChannelPool
from clowder_balancer.config import BalancerConfig, split_host_port
from clowder_balancer.console import install_console
from clowder_balancer.discovery import Discovery
from clowder_balancer.gateway import RuntimeStatsApi, gateway_targets, install_gateway
from clowder_balancer.grpc_api import InferenceServicer
from clowder_balancer.http_api import HttpApi
from clowder_balancer.load import LoadReporter
from clowder_balancer.metrics import Metrics
from clowder_balancer.pipeline import Pipeline
from clowder_balancer.router import Router
from clowder_balancer.routing.registry import RoutingPlugins
from clowder_balancer.traffic_split import RevisionReporter, ServiceDirectory, TrafficSplit
from clowder_balancer.tenancy.fairness import FairQueue
from clowder_balancer.tenancy.gate import Tenancy, TenancySettings
from clowder_balancer.tenancy.groups import GroupLimitsStore
from clowder_balancer.tenancy.quota import QuotaLimiter
from clowder_balancer.tenancy.usage import UsageMeter

log = logging.getLogger(__name__)


class BalancerApp:
    """The running balancer; `http_port` and `grpc_port` are the bound ports once started."""

    def __init__(self, config: BalancerConfig, plugins: RoutingPlugins | None = None, admin_token: str | None = None,
                 tracer_provider=None) -> None:
        self.config = config
        self.security = load_security(config)
        self.state = EtcdState(config.etcd_endpoints, config.etcd_prefix, self.security.etcd_tls)
        self.metrics = Metrics()
        self.channels = ChannelPool(self.security)
        # Services (revisions and their traffic split): see traffic_split.py.
        self.services = ServiceDirectory(self.state)
        self.discovery = Discovery(self.state, on_endpoints_change=self._endpoints_changed,
                                   grace_s=config.endpoint_grace_s, services=self.services)
        self.traffic = TrafficSplit(self.services, lambda d: bool(self.discovery.registered_endpoints(d)),
                                    self.metrics.registry)
        self.revision_reporter = RevisionReporter(self.state, self.traffic, config.name,
                                                  config.load_report_interval_s, config.load_lease_ttl_s)
        self.router = Router(config, self.discovery, self.channels, self.metrics, plugins,
                             tracer_provider=tracer_provider, traffic=self.traffic)
        self._tracer_provider = tracer_provider
        self.load_reporter = LoadReporter(self.state, self.router.tracker, config.name,
                                          config.load_report_interval_s, config.load_lease_ttl_s)
        self._http_host, self._http_port_wanted = split_host_port(config.http_listen, "http_listen")
        self.api_keys = ApiKeyStore(self.state)
        self.tenancy = Tenancy(
            QuotaLimiter(self.state, config.quota_etcd_timeout_s, config.quota_local_fallback_s),
            UsageMeter(self.state, self.metrics.registry, config.usage_flush_interval_s),
            FairQueue(self._model_slots, self.metrics.registry, config.queue_max_per_model, config.queue_timeout_s,
                      config.queue_idle_tenant_window_s),
            GroupLimitsStore(self.state), TenancySettings(config.completion_estimate_tokens))
        self.pipeline = Pipeline(self.router, self.discovery, self.tenancy)
        self._http = HttpApi(self.router, self.discovery, self.metrics, config.max_body_bytes, config.session_header,
                             self.pipeline, self.api_keys, config.require_api_keys)
        self._servicer = InferenceServicer(self.router, self.discovery, self.metrics, config.session_header,
                                           self.pipeline, self.api_keys, config.require_api_keys)
        self.batches = Batches(
            BatchSettings(config.batch_max_file_bytes, config.batch_chunk_lines, config.batch_max_in_flight,
                          config.batch_reserve_slots, config.batch_claim_ttl_s),
            self.state, self.pipeline, self.discovery, self.router, self.api_keys, self.metrics, admin_token,
            config.name, config.require_api_keys, self.security)
        self._api_key_servicer = ApiKeyServicer(self.api_keys, admin_token, self.tenancy)
        self._admin_token = admin_token
        self._runner: web.AppRunner | None = None
        self._grpc: GrpcServer | None = None
        self.http_port = 0
        self.grpc_port = 0
        self._stop_task: asyncio.Task | None = None

    def _model_slots(self, model: str) -> int:
        """Slots of the model's ready replicas, as their stats say (0: not known, the fair queue stays open)."""
        return sum(self.router.stats.get(e.address).slots for e in self.discovery.endpoints(model))

    def _endpoints_changed(self) -> None:
        # Registered ones only: a fallback endpoint (see Discovery.fallback_endpoints) gets a channel per use,
        # and routing state of a replica that left starts afresh.
        live = self.discovery.registered_addresses()
        self.channels.sync(live)
        self.router.endpoints_changed(live)

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
        await self.services.start()
        await self.discovery.start()
        await self.api_keys.start()
        await self.router.stats.start()
        await self.load_reporter.start()
        await self.revision_reporter.start()
        await self.tenancy.start()
        # No server-wide admin token: inference takes user keys; ApiKeyService checks the admin token itself.
        self._grpc = create_grpc_server(self.config.grpc_listen,
                                        [self._servicer.register, self._api_key_servicer.register,
                                         self.batches.register],
                                        tracer_provider=self._tracer_provider, tls=self.security.tls)
        await self._grpc.start()
        self.grpc_port = self._grpc.port
        # handler_cancellation: a client that hangs up cancels its handler, and so its runtime call.
        http_app = self._http.application()
        self.batches.install(http_app)
        install_console(http_app)
        # The REST gateway (see gateway/api.py) turns /api/v1/* into calls on the control-plane gRPC services.
        grpc_host = split_host_port(self.config.grpc_listen, "grpc_listen")[0]
        own = "127.0.0.1" if grpc_host in ("0.0.0.0", "::", "") else grpc_host
        install_gateway(http_app, gateway_targets(f"{own}:{self.grpc_port}", self.config.controller_address),
                        security=self.security,
                        runtime_stats=RuntimeStatsApi(self.discovery, self.channels, self._admin_token))
        self._runner = web.AppRunner(
            http_app,
            handler_cancellation=True,
            shutdown_timeout=self.config.drain_grace_s,
            access_log=None,
        )
        await self._runner.setup()
        # Batch work starts with the HTTP face up, so a batch created here is also run here.
        await self.batches.start()
        site = web.TCPSite(self._runner, self._http_host, self._http_port_wanted,
                           ssl_context=self.security.tls.ssl_context())
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
        await self.batches.stop()
        await self.pipeline.drain()
        await self.tenancy.stop()
        await self.load_reporter.stop()
        await self.revision_reporter.stop()
        await self.router.stats.stop()
        await self.channels.close()
        await self.discovery.stop()
        await self.services.stop()
        await self.api_keys.stop()
        await self.state.close()
        log.info("stopped")


async def create_balancer(config: BalancerConfig, plugins: RoutingPlugins | None = None,
                          admin_token: str | None = None, tracer_provider=None) -> BalancerApp:
    """Build the balancer (nothing listens until `start()`). Without `admin_token`, API keys cannot be managed.
    Spans go to `tracer_provider`, else the global one; routing profiles are built from the plugin types of
    `plugins` (routing/registry.py: the built-in ones by default)."""
    return BalancerApp(config, plugins, admin_token, tracer_provider)
