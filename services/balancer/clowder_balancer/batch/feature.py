"""Batch jobs assembled for the balancer: the API core, its HTTP and gRPC faces, and the worker."""

from __future__ import annotations

import grpc
from aiohttp import web

from clowder_common.etcd import EtcdState
from clowder_common.security import NO_SECURITY, ClusterSecurity

from clowder_balancer.apikeys import ApiKeyStore
from clowder_balancer.discovery import Discovery
from clowder_balancer.metrics import Metrics
from clowder_balancer.pipeline import Pipeline
from clowder_balancer.router import Router
from clowder_balancer.batch.blobs import BlobClient
from clowder_balancer.batch.capacity import Capacity
from clowder_balancer.batch.grpc_api import BatchServicer
from clowder_balancer.batch.http import BatchHttp
from clowder_balancer.batch.invoke import Invoker
from clowder_balancer.batch.service import BatchApi, BatchSettings
from clowder_balancer.batch.store import BatchStore
from clowder_balancer.batch.worker import BatchWorker


class Batches:
    def __init__(self, settings: BatchSettings, state: EtcdState, pipeline: Pipeline, discovery: Discovery,
                 router: Router, keys: ApiKeyStore, metrics: Metrics, admin_token: str | None, balancer: str,
                 require_keys: bool, security: ClusterSecurity = NO_SECURITY) -> None:
        self.blobs = BlobClient(state, admin_token, security)
        self.api = BatchApi(BatchStore(state), self.blobs, settings)
        self.http = BatchHttp(self.api, keys, require_keys)
        self.servicer = BatchServicer(self.api, keys, require_keys)
        self.worker = BatchWorker(self.api, Invoker(pipeline, discovery, metrics),
                                  Capacity(discovery, router, settings.reserve_slots), keys, balancer)

    def install(self, app: web.Application) -> None:
        self.http.install(app)

    def register(self, server: grpc.aio.Server) -> str:
        return self.servicer.register(server)

    async def start(self) -> None:
        await self.worker.start()

    async def stop(self) -> None:
        await self.worker.stop()
        await self.blobs.close()
