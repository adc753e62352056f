"""Assemble a runtime replica: resolve and load the model, serve gRPC, register the endpoint, drain on stop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import pathlib
import socket
import tempfile

from clowder.controller.v1 import resources_pb2
from clowder.runtime.v1 import adapters_pb2, runtime_pb2

from clowder_common.auth import TOKEN_ENV
from clowder_common.errors import InvalidArgument
from clowder_common.grpc_server import GrpcServer, create_grpc_server
from clowder_common.security import NO_SECURITY, ClusterSecurity, load_security
from clowder_common import keys
from clowder_common.keys import validate_name
from clowder_runtime.chat_template import check_template
from clowder_runtime.config import RuntimeConfig
from clowder_common.runtime_settings import (
    MAX_CONTEXT_SIZE, MAX_SLOTS, MAX_THREADS, MIN_CONTEXT_SIZE, RuntimeSettings, of_message, with_defaults,
)
from clowder_runtime.engine import LlamaEngine, LlamaSettings
from clowder_runtime.live_adapters import LiveAdapters
from clowder_runtime.metrics import MetricsServer
from clowder_runtime.model_source import resolve_model_path
from clowder_runtime.node_share import NodeShare
from clowder_runtime.registration import EndpointRegistration
from clowder_runtime.service import AdapterServicer, RuntimeServicer, adapter_registrar, registrar
from clowder_runtime.validation import validate_image_config

log = logging.getLogger(__name__)

_WILDCARD_HOSTS = ("", "0.0.0.0", "::", "[::]")
# The burst wait holds a burst's first token: beyond a second it would be a stall, not a wait.
MAX_BURST_WAIT_MS = 1000.0


class RuntimeApp:
    """One replica. `start()` returns once it serves (and is registered, with etcd configured)."""

    def __init__(self, config: RuntimeConfig, image_config: resources_pb2.ImageConfiguration,
                 admin_token: str | None, security: ClusterSecurity = NO_SECURITY) -> None:
        self.config = config
        # With a service credential, only cluster components (the balancer) may call this replica.
        self._security = security
        self.image_config = image_config
        self._admin_token = admin_token
        self.engine: LlamaEngine | None = None
        self.model_path: str | None = None
        self._server: GrpcServer | None = None
        self._registration: EndpointRegistration | None = None
        self.node_share: NodeShare | None = None
        self.metrics: MetricsServer | None = None
        self.adapters: LiveAdapters | None = None
        self._stop_task: asyncio.Future[None] | None = None

    @property
    def settings(self) -> RuntimeSettings:
        """Slots, threads, context and batch size: this runtime's flags, else the image's, else the defaults."""
        return runtime_settings(self.config, self.image_config)

    @property
    def follows_node(self) -> bool:
        """Threads follow the runtimes on the node: asked for, and neither an image setting nor etcd lacking."""
        return bool(self.config.node_cpus and self.config.etcd_endpoints
                    and not of_message(self.image_config).threads)

    @property
    def context_size(self) -> int:
        return self.settings.context_size

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("the runtime is not started")
        return self._server.port

    @property
    def address(self) -> str:
        """host:port others should dial (what the endpoint in etcd says)."""
        host = self.config.advertise_host or self.config.listen.rpartition(":")[0]
        if host in _WILDCARD_HOSTS:
            host = socket.gethostname()
        return f"{host}:{self.port}"

    @property
    def model_name(self) -> str:
        if self.config.deployment:
            return self.config.deployment
        return pathlib.Path(self.model_path or self.config.model_path or "model").stem

    async def start(self) -> None:
        try:
            await self._start()
        except BaseException:
            await self.stop()
            raise

    async def _start(self) -> None:
        cfg = self.config
        self.model_path = await resolve_model_path(cfg.model_path, cfg.digest, cfg.storage_address, self._admin_token,
                                                   security=self._security)
        settings = self.settings
        self.engine = LlamaEngine(
            LlamaSettings(
                model_path=self.model_path,
                context_size=settings.context_size,
                threads=settings.threads or (cfg.node_cpus if self.follows_node else 0),
                max_waiting=cfg.max_waiting,
                slots=settings.slots,
                prefill_chunk=settings.batch_size,
                adapters=parse_adapters(cfg.adapters),
                # The runtime's own option wins over the aimage's (an operator fixing one replica by hand).
                chat_template=chat_template(cfg) or self.image_config.chat_template,
                idle_cache_tokens=cfg.idle_cache_tokens,
                burst_gap_s=cfg.burst_gap_ms / 1000,
                burst_wait_max_s=cfg.burst_wait_max_ms / 1000,
            )
        )
        if self.follows_node:
            # Started before the model loads, so the context may already start on its share.
            self.node_share = NodeShare(
                cfg.etcd_endpoints, cfg.etcd_prefix, cfg.node,
                keys.endpoint(cfg.deployment, cfg.replica_id),
                cfg.node_cpus, self.engine.set_threads, etcd_tls=self._security.etcd_tls,
            )
            await self.node_share.start()
        # Loads on the engine's own thread; nothing is served or registered before it can generate.
        await self.engine.start()
        # Adapters loaded while serving (AdapterService) join the ones given at start.
        self.adapters = LiveAdapters(self.engine, parse_adapters(cfg.adapters),
                                     self._adapter_path if cfg.storage_address else None, self._publish_adapters,
                                     cfg.adapter_unload_grace_s, cfg.max_adapters)
        servicer = RuntimeServicer(self.engine, self.model_name, self.image_config, adapters=self.adapters.names)
        self._server = create_grpc_server(cfg.listen, [registrar(servicer),
                                                       adapter_registrar(AdapterServicer(self.adapters))],
                                          service_token=self._security.service_token, tls=self._security.tls)
        await self._server.start()
        if cfg.metrics_listen:
            self.metrics = MetricsServer(cfg.metrics_listen, self.engine.stats, self.model_name)
            await self.metrics.start()
        if cfg.port_file:
            _write_atomically(cfg.port_file, f"{self.port}\n")
        if cfg.etcd_endpoints:
            self._registration = EndpointRegistration(
                cfg.etcd_endpoints,
                cfg.etcd_prefix,
                runtime_pb2.Endpoint(
                    deployment=cfg.deployment,
                    replica_id=cfg.replica_id,
                    address=self.address,
                    node=cfg.node,
                    image_digest=cfg.digest,
                    adapters=self.adapters.listed(),
                ),
                cfg.lease_ttl_s,
                etcd_tls=self._security.etcd_tls,
            )
            await self._registration.start()
        log.info("runtime ready model=%s address=%s registered=%s", self.model_name, self.address,
                 bool(cfg.etcd_endpoints))

    async def _adapter_path(self, digest: str) -> str:
        """The local path of an adapter blob in this node's storage."""
        return await resolve_model_path("", digest, self.config.storage_address, self._admin_token,
                                        security=self._security)

    async def _publish_adapters(self, adapters: list[adapters_pb2.AdapterInfo]) -> None:
        if self._registration is not None:
            await self._registration.set_adapters(adapters)

    async def stop(self) -> None:
        """Idempotent drain: NOT_SERVING, withdraw the endpoint, let generations finish, free the model."""
        if self._stop_task is None:
            self._stop_task = asyncio.ensure_future(self._stop())
        await asyncio.shield(self._stop_task)

    async def _stop(self) -> None:
        grace = self.config.drain_grace_s
        if self._server is not None:
            await self._server.set_serving(False)
        # The endpoint goes first so balancers stop sending work here while we drain.
        if self._registration is not None:
            try:
                await self._registration.stop()
            except Exception:
                log.exception("withdrawing the endpoint failed; its lease expires by itself")
        if self._server is not None:
            # Refuses new calls at once; running generations get `grace` seconds, then are cancelled.
            await self._server.stop(grace)
        if self.metrics is not None:
            await self.metrics.stop()
        if self.adapters is not None:
            await self.adapters.close()
        if self.node_share is not None:
            await self.node_share.stop()
        if self.engine is not None:
            await self.engine.close(timeout=max(grace, 1.0))
        if self._server is not None and self.config.port_file:
            _remove_if_ours(self.config.port_file, f"{self._server.port}\n")
        log.info("runtime stopped")


async def create_runtime(
    config: RuntimeConfig,
    image_config: resources_pb2.ImageConfiguration | None = None,
    *,
    admin_token: str | None = None,
    security: ClusterSecurity | None = None,
) -> RuntimeApp:
    """Check the configuration and build the app; `start()` does the slow parts.

    `admin_token` is sent to the storage service when the model is given by
    digest; it defaults to the CLOWDER_ADMIN_TOKEN environment variable. `security` (the service credential
    that callers must present, and TLS) defaults to what the config and CLOWDER_SERVICE_TOKEN say.
    """
    image_config = image_config if image_config is not None else resources_pb2.ImageConfiguration()
    validate_image_config(image_config)
    if config.etcd_endpoints:
        validate_name(config.deployment, "deployment")
        validate_name(config.replica_id, "replica_id")
    for name in ("threads", "node_cpus", "context_size", "max_waiting", "idle_cache_tokens", "slots", "prefill_chunk"):
        if getattr(config, name) < 0:
            raise InvalidArgument(f"{name} must not be negative", field=name)
    for name in ("burst_gap_ms", "burst_wait_max_ms"):
        value = getattr(config, name)
        # The comparison also refuses NaN, which would reach the decode thread's wait.
        if not 0 <= value <= MAX_BURST_WAIT_MS:
            raise InvalidArgument(f"{name} must be between 0 and {MAX_BURST_WAIT_MS:g} ms, got {value}", field=name)
    settings = runtime_settings(config, image_config)
    if settings.slots > MAX_SLOTS:
        raise InvalidArgument(f"slots must be at most {MAX_SLOTS} (llama.cpp's limit), got {settings.slots}",
                              field="slots")
    if settings.threads > MAX_THREADS:
        raise InvalidArgument(f"threads must be at most {MAX_THREADS} (llama.cpp's limit), got {settings.threads}",
                              field="threads")
    if not MIN_CONTEXT_SIZE <= settings.context_size <= MAX_CONTEXT_SIZE:
        raise InvalidArgument(f"context_size must be between {MIN_CONTEXT_SIZE} and {MAX_CONTEXT_SIZE}, "
                              f"got {settings.context_size}", field="context_size")
    if config.metrics_listen and not config.metrics_listen.rpartition(":")[2].isdigit():
        raise InvalidArgument(f"metrics_listen {config.metrics_listen!r} is not host:port", field="metrics_listen")
    parse_adapters(config.adapters)
    chat_template(config)
    if config.max_adapters < 0:
        raise InvalidArgument("max_adapters must not be negative", field="max_adapters")
    if config.max_adapters and len(config.adapters) > config.max_adapters:
        raise InvalidArgument(f"{len(config.adapters)} adapters given, more than max_adapters ({config.max_adapters})",
                              field="adapters")
    if config.drain_grace_s < 0:
        raise InvalidArgument("drain_grace_s must not be negative", field="drain_grace_s")
    if config.lease_ttl_s < 1:
        raise InvalidArgument("lease_ttl_s must be at least 1", field="lease_ttl_s")
    if admin_token is None:
        admin_token = os.environ.get(TOKEN_ENV) or None
    if security is None:
        security = load_security(config)
    if security.service_token is None:
        # A runtime started by hand (development, benchmarks); the controller always hands one over.
        log.warning("no service credential configured: anyone who reaches this runtime's port can call it")
    return RuntimeApp(config, image_config, admin_token, security)


def runtime_settings(config: RuntimeConfig, image_config: resources_pb2.ImageConfiguration) -> RuntimeSettings:
    """The runtime's own settings (an operator fixing one replica by hand, or the controller's resolved ones)
    win over the image's; what neither sets takes the defaults (threads 0: every CPU)."""
    own = RuntimeSettings(slots=config.slots, threads=config.threads, context_size=config.context_size,
                          batch_size=config.prefill_chunk)
    return with_defaults(own.over(of_message(image_config)))


def parse_adapters(specs: tuple[str, ...]) -> dict[str, str]:
    """"name=path" items into {name: path}; names are what requests select."""
    adapters: dict[str, str] = {}
    for index, spec in enumerate(specs):
        name, sep, path = spec.partition("=")
        name, path = name.strip(), path.strip()
        if not sep or not path:
            raise InvalidArgument(f"adapter {spec[:80]!r} is not name=path", field=f"adapters[{index}]")
        validate_name(name, f"adapters[{index}]")
        if name in adapters:
            raise InvalidArgument(f"adapter {name!r} is listed twice", field=f"adapters[{index}]")
        if not os.path.isfile(path):
            raise InvalidArgument(f"adapter file {path} does not exist", field=f"adapters[{index}]")
        adapters[name] = path
    return adapters


def chat_template(config: RuntimeConfig) -> str:
    """The configured override of the model's chat template, checked; "" keeps the model's own."""
    if config.chat_template and config.chat_template_file:
        raise InvalidArgument("set chat_template or chat_template_file, not both", field="chat_template_file")
    if config.chat_template_file:
        try:
            source = pathlib.Path(config.chat_template_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise InvalidArgument(f"cannot read the chat template file: {exc}", field="chat_template_file") from None
        check_template(source, "chat_template_file")
        return source
    if config.chat_template:
        check_template(config.chat_template, "chat_template")
    return config.chat_template


def _write_atomically(path: str, text: str) -> None:
    """Readers polling for the file never see it half written."""
    target = pathlib.Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _remove_if_ours(path: str, text: str) -> None:
    # A newer runtime may have taken the file over; leave its port alone.
    with contextlib.suppress(OSError):
        if pathlib.Path(path).read_text() == text:
            os.unlink(path)
