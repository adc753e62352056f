"""Assembles the storage service: store, sources, puller, gRPC server and node registration.

Every part gets what it uses in its constructor, so create_storage builds them in dependency order:

    executor -> store -> index -> http, peer, oci -> sources -> state -> registration -> space -> puller
             -> images (ImagePuller) -> servicer -> server -> StorageApp
"""

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
from clowder_storage.image_pulls import ImagePuller
from clowder_storage.images import ImageIndex
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
        *,
        executor: concurrent.futures.ThreadPoolExecutor,
        store: BlobStore,
        http: HttpFetcher,
        peer: PeerFetcher,
        state: EtcdState,
        registration: NodeRegistration,
        puller: Puller,
        index: ImageIndex,
        images: ImagePuller,
        space: Space,
        server: GrpcServer,
    ) -> None:
        self.config = config
        self.store = store
        self.state = state
        self.registration = registration
        self.puller = puller
        self.index = index
        self.images = images
        self.space = space
        self.server = server
        self.address = advertised_address(config, server.port)
        self._executor = executor
        self._http = http
        self._peer = peer
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
        with contextlib.suppress(Exception):
            await self._peer.close()
        await self.state.close()
        # puller.close() waited for every file operation, so nothing is left to run here.
        self._executor.shutdown(wait=False, cancel_futures=True)
        log.info("storage stopped")


def _sources(config: StorageConfig, store: BlobStore, http: HttpFetcher, peer: PeerFetcher,
             oci: OciClient) -> Sources:
    """One fetcher per URL scheme: file, http(s), hf, peer, s3, oci."""
    return Sources([
        FileFetcher(store.run, config.file_roots), http, HfFetcher(http, config.hf_endpoint), peer,
        S3Fetcher(store.run, config.s3_endpoint, config.s3_region, config.http_connect_timeout_s,
                  config.http_read_timeout_s),
        oci,
    ])


def _puller(config: StorageConfig, store: BlobStore, sources: Sources, space: Space, state: EtcdState,
            registration: NodeRegistration, peer: PeerFetcher) -> Puller:
    return Puller(
        store, sources, space, registration.store_changed, config.max_parallel_pulls,
        progress_interval_s=config.progress_interval_s,
        reserve_free_bytes=config.reserve_free_bytes,
        options=TransferOptions(parallel_min_bytes=config.parallel_min_bytes,
                                parallel_parts=config.parallel_parts, retries=config.pull_retries,
                                min_part_bytes=config.parallel_part_min_bytes,
                                max_part_bytes=config.parallel_part_max_bytes),
        max_blob_bytes=config.max_blob_bytes,
        peers=PeerDirectory(state, config.node_name, registration, peer) if config.peer_pulls else None,
        origin_allowed=not config.peers_only,
    )


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
        index = ImageIndex(store)
        await index.prepare()
        http = HttpFetcher(config.http_connect_timeout_s, config.http_read_timeout_s, config.http_total_timeout_s)
        peer = PeerFetcher(admin_token, config.http_read_timeout_s, security)
        oci = OciClient(http, store, index, config.insecure_registries)
        sources = _sources(config, store, http, peer, oci)
        state = EtcdState(config.etcd_endpoints, config.etcd_prefix, security.etcd_tls)
        registration = NodeRegistration(
            state, store, config.node_name, config.labels, config.lease_ttl_s, config.node_refresh_s,
            gpus=config.gpus if config.gpus >= 0 else count_gpus(),
        )
        space = Space(store, index.referenced, index.metadata, config.max_store_bytes,
                      config.high_watermark, config.low_watermark, config.gc_grace_s)
        await space.prepare()
        puller = _puller(config, store, sources, space, state, registration, peer)
        images = ImagePuller(store, index, puller, space, oci)
        servicer = StorageServicer(store, puller, index, images, space, oci, on_change=registration.store_changed)
        server = create_grpc_server(config.listen, [registrar(servicer)], admin_token=admin_token,
                                    service_token=security.service_token, tls=security.tls)
    except BaseException:
        executor.shutdown(wait=False, cancel_futures=True)
        raise
    return StorageApp(config, executor=executor, store=store, http=http, peer=peer, state=state,
                      registration=registration, puller=puller, index=index, images=images, space=space,
                      server=server)
