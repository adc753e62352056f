"""Assembles the storage service: store, sources, puller, gRPC server and node registration."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import socket

from clowder_common.etcd import EtcdState
from clowder_common.grpc_server import GrpcServer, create_grpc_server
from clowder_common.security import ClusterSecurity, load_security

from clowder_storage.config import StorageConfig
from clowder_storage.hf import HfFetcher
from clowder_storage.images import ImageStore
from clowder_storage.oci import OciClient
from clowder_storage.peer import PeerDirectory, PeerFetcher
from clowder_storage.puller import Puller
from clowder_storage.registration import NodeRegistration, count_gpus
from clowder_storage.s3 import S3Fetcher
from clowder_storage.service import StorageServicer, registrar
from clowder_storage.sources import FileFetcher, HttpFetcher, Sources
from clowder_storage.space import Space
from clowder_storage.store import BlobStore
from clowder_storage.transfer import TransferOptions

log = logging.getLogger(__name__)

_WILDCARD_HOSTS = ("", "0.0.0.0", "::", "[::]")


def advertised_address(config: StorageConfig, port: int) -> str:
    """The address others dial: configured, else the listen host (this machine's name on a wildcard)."""
    if config.advertise_address:
        host, sep, given = config.advertise_address.rpartition(":")
        if sep and given.isdigit() and not host.endswith(":"):
            return config.advertise_address
        return f"{config.advertise_address}:{port}"
    host = config.listen.rpartition(":")[0]
    if host in _WILDCARD_HOSTS:
        host = socket.getfqdn()
    return f"{host}:{port}"


class StorageApp:
    """One node's storage service. `start()` serves and registers; `stop()` drains and may be called twice."""

    def __init__(
        self,
        config: StorageConfig,
        store: BlobStore,
        puller: Puller,
        http: HttpFetcher,
        server: GrpcServer,
        state: EtcdState,
        registration: NodeRegistration,
        executor: concurrent.futures.ThreadPoolExecutor,
        images: ImageStore | None = None,
        space: Space | None = None,
        closers: tuple = (),
    ) -> None:
        self.config = config
        self.images = images
        self.space = space
        self._closers = closers
        self.store = store
        self.puller = puller
        self.server = server
        self.state = state
        self.registration = registration
        self.address = advertised_address(config, server.port)
        self._http = http
        self._executor = executor
        self._started = False
        self._stop_task: asyncio.Task | None = None

    @property
    def port(self) -> int:
        return self.server.port

    @property
    def node_key(self) -> str:
        return self.registration.key

    async def start(self) -> None:
        # etcd first: a node that cannot register should fail before it accepts any call.
        await self.state.connect()
        self._started = True
        await self.server.start()
        # Registered only once serving, so whoever sees the node can call it.
        await self.registration.start(self.address)

    async def stop(self) -> None:
        if self._stop_task is None:
            self._stop_task = asyncio.ensure_future(self._stop())
        await asyncio.shield(self._stop_task)

    async def _stop(self) -> None:
        if self._started:
            await self.server.set_serving(False)
            # Gone from etcd first, so the controller stops sending pulls while we drain.
            with contextlib.suppress(Exception):
                await self.registration.stop()
        await self.server.stop(self.config.shutdown_grace_s if self._started else 0)
        await self.puller.close()
        # Blobs stored in the last seconds reach the disk now; a crash instead is what the journal covers.
        with contextlib.suppress(Exception):
            await self.store.close(self.config.shutdown_grace_s + 30)
        await self._http.close()
        for close in self._closers:
            with contextlib.suppress(Exception):
                await close()
        await self.state.close()
        # puller.close() waited for every file operation, so nothing is left to run here.
        self._executor.shutdown(wait=False, cancel_futures=True)
        log.info("storage stopped")


async def create_storage(config: StorageConfig, admin_token: str | None,
                         security: ClusterSecurity | None = None) -> StorageApp:
    """Build the service and bind its port (`config.listen`, port 0 for any); nothing is served before start().

    With `admin_token`, every StorageService call needs "authorization: Bearer <token>", unless it carries the
    cluster's service credential (`security`, by default read as the config and CLOWDER_SERVICE_TOKEN say).
    """
    security = security if security is not None else load_security(config)
    executor = concurrent.futures.ThreadPoolExecutor(config.io_threads, thread_name_prefix="storage-io")
    try:
        store = BlobStore(config.data_dir, executor, config.background_flush_min_bytes)
        await store.prepare()
        http = HttpFetcher(config.http_connect_timeout_s, config.http_read_timeout_s, config.http_total_timeout_s)
        peer = PeerFetcher(admin_token, config.http_read_timeout_s, security)
        sources = Sources([
            FileFetcher(store.run, config.file_roots), http, HfFetcher(http, config.hf_endpoint), peer,
            S3Fetcher(store.run, config.s3_endpoint, config.s3_region, config.http_connect_timeout_s,
                      config.http_read_timeout_s),
        ])
        state = EtcdState(config.etcd_endpoints, config.etcd_prefix, security.etcd_tls)
        registration = NodeRegistration(
            state, store, config.node_name, config.labels, config.lease_ttl_s, config.node_refresh_s,
            gpus=config.gpus if config.gpus >= 0 else count_gpus(),
        )
        space_ref: list[Space] = []

        def stored() -> None:
            registration.store_changed()
            # Over the high watermark after a pull: evict in the background, the pull itself is done.
            if space_ref and space_ref[0].quota_bytes:
                task = asyncio.ensure_future(space_ref[0].enforce_watermarks())
                task.add_done_callback(lambda t: t.cancelled() or t.exception())

        async def make_room(needed: int) -> None:
            await space_ref[0].make_room(needed)

        puller = Puller(
            store, sources, config.max_parallel_pulls,
            progress_interval_s=config.progress_interval_s,
            reserve_free_bytes=config.reserve_free_bytes,
            on_stored=stored,
            options=TransferOptions(parallel_min_bytes=config.parallel_min_bytes,
                                    parallel_parts=config.parallel_parts, retries=config.pull_retries,
                                    min_part_bytes=config.parallel_part_min_bytes,
                                    max_part_bytes=config.parallel_part_max_bytes),
            make_room=make_room,
            max_blob_bytes=config.max_blob_bytes,
            peers=PeerDirectory(state, config.node_name, registration, peer) if config.peer_pulls else None,
            origin_allowed=not config.peers_only,
        )
        images = ImageStore(store, puller)
        await images.prepare()
        space = Space(store, images.referenced, images.metadata, config.max_store_bytes,
                      config.high_watermark, config.low_watermark, config.gc_grace_s)
        await space.prepare()
        images.space = space
        space_ref.append(space)
        oci = OciClient(http, store, images, config.insecure_registries)
        sources.register(oci)
        servicer = StorageServicer(store, puller, on_change=registration.store_changed, images=images, space=space,
                                   oci=oci)
        server = create_grpc_server(config.listen, [registrar(servicer)], admin_token=admin_token,
                                    service_token=security.service_token, tls=security.tls)
    except BaseException:
        executor.shutdown(wait=False, cancel_futures=True)
        raise
    return StorageApp(config, store, puller, http, server, state, registration, executor, images, space,
                      closers=(peer.close,))
