"""A deployment's LoRA adapters at run time: the AdapterService API, and the leader's loop that keeps every ready
replica loaded with its deployment's set (node storage pulls the GGUF, the runtime loads it without a restart)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

import grpc
from clowder.controller.v1 import adapters_pb2, adapters_pb2_grpc, resources_pb2
from clowder.runtime.v1 import adapters_pb2 as runtime_adapters_pb2
from clowder.runtime.v1 import adapters_pb2_grpc as runtime_adapters_pb2_grpc
from clowder.runtime.v1 import runtime_pb2
from clowder.storage.v1 import storage_pb2
from clowder_common import keys
from clowder_common.auth import bearer_metadata
from clowder_common.clients import StorageStubs, aio_channel
from clowder_common.errors import ClowderError, FailedPrecondition, InvalidArgument, NotFound, from_rpc_error
from clowder_common.etcd import UNFENCED, EtcdState, Fence, PrefixCache
from clowder_common.keys import validate_name
from clowder_common.security import NO_SECURITY, ClusterSecurity
from clowder_common.tasks import cancel_and_wait, run_periodically

from clowder_controller.caches import stop_caches
from clowder_controller.validation import validate_credentials_ref, validate_source_url

log = logging.getLogger(__name__)

# etcd: adapters/<deployment>/<name> -> clowder.controller.v1.Adapter (no lease: desired state).
ADAPTERS = "adapters/"
# A pull of a big adapter on a slow link is long; a hung one is not forever.
PULL_DEADLINE_S = 3600.0
LOAD_DEADLINE_S = 300.0
# Unloading waits for the streams that use the adapter to finish.
UNLOAD_DEADLINE_S = 1800.0
# Between full passes when nothing wakes the loop (endpoints, adapters and nodes changing wake it at once).
SYNC_INTERVAL_S = 10.0
# A replica whose adapters failed to converge waits this long (doubling, up to the max) before the next try.
RETRY_BASE_S = 1.0
RETRY_MAX_S = 60.0


def adapters_of(deployment: str) -> str:
    return f"{ADAPTERS}{deployment}/"


def adapter_key(deployment: str, name: str) -> str:
    return f"{ADAPTERS}{deployment}/{name}"


def pin_holder(deployment: str, replica_id: str) -> str:
    """The replica's storage pin holder (the reconciler's): its adapters' blobs are released with it."""
    return f"{deployment}/{replica_id}"


def holds(endpoint: runtime_pb2.Endpoint, adapter: adapters_pb2.Adapter) -> bool:
    """Whether the replica serves this adapter (by name, and by digest once both sides know it)."""
    for loaded in endpoint.adapters:
        if loaded.name == adapter.name:
            return loaded.fixed or not (adapter.digest and loaded.digest) or loaded.digest == adapter.digest
    return False


def plan(endpoint: runtime_pb2.Endpoint, wanted: dict[str, adapters_pb2.Adapter]
         ) -> tuple[list[str], list[adapters_pb2.Adapter]]:
    """What a replica must unload (names) and load to serve `wanted`: adapters it has that are no longer wanted,
    or wanted from another digest, go; wanted ones it lacks come. Adapters it was started with (fixed) stay."""
    fixed = {a.name for a in endpoint.adapters if a.fixed}
    unload = [a.name for a in endpoint.adapters
              if not a.fixed and (a.name not in wanted or not holds(endpoint, wanted[a.name]))]
    load = [a for name, a in sorted(wanted.items()) if name not in fixed and not holds(endpoint, a)]
    return unload, load


def validate_adapter(adapter: adapters_pb2.Adapter) -> None:
    validate_name(adapter.deployment, "adapter.deployment")
    validate_name(adapter.name, "adapter.name")
    validate_source_url(adapter.source_url, "adapter.source_url")
    if adapter.source_url.startswith("oci://"):
        raise InvalidArgument("an adapter comes from file://, http(s)://, hf:// or s3://, not oci://",
                              field="adapter.source_url")
    if adapter.digest and not (adapter.digest.startswith("sha256:") and len(adapter.digest) == 71
                               and all(c in "0123456789abcdef" for c in adapter.digest[7:])):
        raise InvalidArgument(f"digest {adapter.digest[:80]!r} is not 'sha256:<64 lowercase hex>'",
                              field="adapter.digest")
    if adapter.credentials_ref:
        validate_credentials_ref(adapter.credentials_ref, "adapter.credentials_ref")


def adapter_registrar(state: EtcdState) -> Callable[[grpc.aio.Server], str]:
    """For create_grpc_server: the AdapterService on every controller replica (leader or not)."""

    def register(server: grpc.aio.Server) -> str:
        adapters_pb2_grpc.add_AdapterServiceServicer_to_server(AdapterServicer(state), server)
        return adapters_pb2.DESCRIPTOR.services_by_name["AdapterService"].full_name

    return register


class AdapterServicer(adapters_pb2_grpc.AdapterServiceServicer):
    """Desired state only: the leader's AdapterSync does the loading; status is read from the endpoints."""

    def __init__(self, state: EtcdState) -> None:
        self._state = state

    async def CreateAdapter(self, request: adapters_pb2.CreateAdapterRequest,
                            context: grpc.aio.ServicerContext) -> adapters_pb2.CreateAdapterResponse:
        adapter = adapters_pb2.Adapter()
        adapter.CopyFrom(request.adapter)
        for output_only in ("create_time", "ready_replicas", "loaded_replicas", "message"):
            adapter.ClearField(output_only)
        validate_adapter(adapter)
        if await self._state.get(self._state.key(keys.deployment(adapter.deployment)),
                                 resources_pb2.Deployment) is None:
            raise NotFound(f"deployment {adapter.deployment!r} does not exist", reason="DEPLOYMENT_NOT_FOUND",
                           metadata={"deployment": adapter.deployment})
        adapter.create_time.GetCurrentTime()
        # ALREADY_EXISTS when the deployment has an adapter of this name.
        await self._state.create(self._state.key(adapter_key(adapter.deployment, adapter.name)), adapter)
        log.info("adapter %s/%s created from %s", adapter.deployment, adapter.name, adapter.source_url)
        await self._with_status([adapter])
        return adapters_pb2.CreateAdapterResponse(adapter=adapter)

    async def GetAdapter(self, request: adapters_pb2.GetAdapterRequest,
                         context: grpc.aio.ServicerContext) -> adapters_pb2.GetAdapterResponse:
        found = await self._get(request.deployment, request.name)
        adapter = found.value
        await self._with_status([adapter])
        return adapters_pb2.GetAdapterResponse(adapter=adapter)

    async def ListAdapters(self, request: adapters_pb2.ListAdaptersRequest,
                           context: grpc.aio.ServicerContext) -> adapters_pb2.ListAdaptersResponse:
        validate_name(request.deployment, "deployment")
        items, _ = await self._state.list(self._state.key(adapters_of(request.deployment)), adapters_pb2.Adapter)
        adapters = sorted((i.value for i in items), key=lambda a: a.name)
        await self._with_status(adapters)
        return adapters_pb2.ListAdaptersResponse(adapters=adapters)

    async def DeleteAdapter(self, request: adapters_pb2.DeleteAdapterRequest,
                            context: grpc.aio.ServicerContext) -> adapters_pb2.DeleteAdapterResponse:
        found = await self._get(request.deployment, request.name)
        if not await self._state.delete(found.key, found.mod_revision):
            raise FailedPrecondition(f"adapter {request.name!r} changed while deleting; try again",
                                     reason="CONCURRENT_MODIFICATION")
        log.info("adapter %s/%s deleted", request.deployment, request.name)
        return adapters_pb2.DeleteAdapterResponse()

    async def _get(self, deployment: str, name: str):
        validate_name(deployment, "deployment")
        validate_name(name, "name")
        found = await self._state.get(self._state.key(adapter_key(deployment, name)), adapters_pb2.Adapter)
        if found is None:
            raise NotFound(f"deployment {deployment!r} has no adapter {name!r}", reason="ADAPTER_NOT_FOUND",
                           metadata={"deployment": deployment, "adapter": name})
        return found

    async def _with_status(self, adapters: list[adapters_pb2.Adapter]) -> None:
        """ready_replicas and loaded_replicas from the endpoints replicas keep in etcd."""
        by_deployment: dict[str, list[runtime_pb2.Endpoint]] = {}
        for adapter in adapters:
            if adapter.deployment not in by_deployment:
                items, _ = await self._state.list(self._state.key(keys.endpoints_of(adapter.deployment)),
                                                  runtime_pb2.Endpoint)
                by_deployment[adapter.deployment] = [i.value for i in items]
            endpoints = by_deployment[adapter.deployment]
            adapter.ready_replicas = len(endpoints)
            adapter.loaded_replicas = sum(1 for e in endpoints if holds(e, adapter))


class AdapterSync:
    """Runs on the leader: each ready replica (an endpoint in etcd) gets its deployment's adapters loaded and the
    ones removed from it unloaded. Level-triggered: endpoints, adapters and nodes changing wake a pass, so a
    replica that starts again (a new endpoint without adapters) is given the current set."""

    def __init__(self, state: EtcdState, admin_token: str | None, security: ClusterSecurity = NO_SECURITY,
                 interval_s: float = SYNC_INTERVAL_S) -> None:
        self._state = state
        self._security = security
        self._metadata = bearer_metadata(admin_token)
        self._storage = StorageStubs(security)
        self._interval = interval_s
        self._wake = asyncio.Event()

        def cache(prefix: str, cls: type) -> PrefixCache:
            return PrefixCache(state, state.key(prefix), cls, on_change=self._wake.set)

        self._adapters = cache(ADAPTERS, adapters_pb2.Adapter)
        self._endpoints = cache(keys.ENDPOINTS, runtime_pb2.Endpoint)
        self._nodes = cache(keys.NODES, resources_pb2.Node)
        self._deployments = cache(keys.DEPLOYMENTS, resources_pb2.Deployment)
        self._caches = [self._adapters, self._endpoints, self._nodes, self._deployments]
        # One convergence at a time per replica; failures back off per replica.
        self._busy: dict[tuple[str, str], asyncio.Task[None]] = {}
        self._failures: dict[tuple[str, str], int] = {}
        self._not_before: dict[tuple[str, str], float] = {}
        self._task: asyncio.Task[None] | None = None
        self._fence: Fence = UNFENCED

    async def start(self, fence: Fence = UNFENCED) -> None:
        self._fence = fence
        for c in self._caches:
            await c.start()
        self._task = asyncio.create_task(run_periodically(self.sync_once, self._interval, self._wake,
                                                          "adapter sync"), name="adapter-sync")
        self._wake.set()

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None
        for task in list(self._busy.values()):
            await cancel_and_wait(task, timeout=5)
        self._busy.clear()
        self._failures.clear()
        self._not_before.clear()
        await stop_caches(self._caches)
        # Channels are made again on demand, should this controller lead again.
        await self._storage.close()
        self._fence = UNFENCED

    async def sync_once(self) -> None:
        if not all(c.ready for c in self._caches):
            return
        wanted: dict[str, dict[str, adapters_pb2.Adapter]] = {}
        deployments = {d.name for d in self._deployments.values()}
        for adapter in self._adapters.values():
            if adapter.deployment not in deployments:
                # The deployment was deleted: its adapters go with it (a new one of that name starts without).
                await self._forget(adapter)
                continue
            wanted.setdefault(adapter.deployment, {})[adapter.name] = adapter
        storage = {n.name: n.storage_address for n in self._nodes.values()}
        now = time.monotonic()
        for endpoint in self._endpoints.values():
            key = (endpoint.deployment, endpoint.replica_id)
            busy = self._busy.get(key)
            if (busy is not None and not busy.done()) or self._not_before.get(key, 0.0) > now:
                continue
            unload, load = plan(endpoint, wanted.get(endpoint.deployment, {}))
            if not (unload or load):
                continue
            if load and not storage.get(endpoint.node):
                log.warning("replica %s/%s: node %s has no storage registered; adapters wait", *key, endpoint.node)
                continue
            self._busy[key] = asyncio.create_task(
                self._converge(endpoint, storage.get(endpoint.node, ""), unload, load),
                name=f"adapters-{endpoint.deployment}-{endpoint.replica_id}")
            self._busy[key].add_done_callback(self._done(key))

    def _done(self, key: tuple[str, str]) -> Callable[[asyncio.Task[None]], None]:
        def done(task: asyncio.Task[None]) -> None:
            if task.cancelled():
                return
            if task.exception() is None:
                self._failures.pop(key, None)
                self._not_before.pop(key, None)
            else:
                failures = self._failures[key] = self._failures.get(key, 0) + 1
                self._not_before[key] = time.monotonic() + min(RETRY_MAX_S, RETRY_BASE_S * 2 ** (failures - 1))
                log.warning("replica %s/%s: adapters did not converge (try %d): %s", *key, failures,
                            task.exception())
            # Another pass sees what changed meanwhile (or schedules the retry).
            self._wake.set()
        return done

    async def _converge(self, endpoint: runtime_pb2.Endpoint, storage_address: str, unload: list[str],
                        load: list[adapters_pb2.Adapter]) -> None:
        if not await self._state.holds(self._fence):
            return  # a deposed leader leaves the replicas to the next one
        holder = pin_holder(endpoint.deployment, endpoint.replica_id)
        async with aio_channel(endpoint.address, self._security) as channel:
            runtime = runtime_adapters_pb2_grpc.AdapterServiceStub(channel)
            for name in unload:
                gone = next((a for a in endpoint.adapters if a.name == name), None)
                log.info("replica %s/%s: unloading adapter %s", endpoint.deployment, endpoint.replica_id, name)
                try:
                    await runtime.UnloadAdapter(runtime_adapters_pb2.UnloadAdapterRequest(name=name),
                                                timeout=UNLOAD_DEADLINE_S)
                except grpc.aio.AioRpcError as err:
                    if err.code() != grpc.StatusCode.NOT_FOUND:
                        raise from_rpc_error(err) from None
                if gone is not None and gone.digest and storage_address:
                    await self._unpin(storage_address, holder, gone.digest)
            for adapter in load:
                try:
                    digest = await self._pull(storage_address, adapter)
                    await self._pin(storage_address, holder, digest)
                    log.info("replica %s/%s: loading adapter %s (%s)", endpoint.deployment, endpoint.replica_id,
                             adapter.name, digest)
                    try:
                        await runtime.LoadAdapter(runtime_adapters_pb2.LoadAdapterRequest(name=adapter.name,
                                                                                          digest=digest),
                                                  timeout=LOAD_DEADLINE_S)
                    except grpc.aio.AioRpcError as err:
                        raise from_rpc_error(err) from None
                except ClowderError as exc:
                    await self._note(adapter, f"replica {endpoint.replica_id}: {exc.message}")
                    raise
                await self._note(adapter, "", digest)

    async def _forget(self, adapter: adapters_pb2.Adapter) -> None:
        # The caches are separate watches: a deployment created just before its adapter may not be in ours yet.
        if await self._state.get(self._state.key(keys.deployment(adapter.deployment)),
                                 resources_pb2.Deployment) is not None:
            return
        key = self._state.key(adapter_key(adapter.deployment, adapter.name))
        current = await self._state.get(key, adapters_pb2.Adapter)
        if current is not None and current.value == adapter:
            if await self._state.delete(key, current.mod_revision, fence=self._fence):
                log.info("adapter %s/%s removed with its deployment", adapter.deployment, adapter.name)

    async def _pull(self, address: str, adapter: adapters_pb2.Adapter) -> str:
        """The node's storage pulls the GGUF (at once when it holds the digest); its digest."""
        request = storage_pb2.PullBlobRequest(
            source_url=adapter.source_url, expected_digest=adapter.digest,
            credentials=storage_pb2.Credentials(secret_ref=adapter.credentials_ref,
                                                username=adapter.credentials_username))
        call = self._storage(address).PullBlob(request, metadata=self._metadata, timeout=PULL_DEADLINE_S)
        blob = None
        try:
            async for message in call:
                if message.HasField("blob"):
                    blob = message.blob
        except grpc.aio.AioRpcError as err:
            raise from_rpc_error(err) from None
        finally:
            call.cancel()
        if blob is None:
            raise FailedPrecondition(f"storage at {address} ended the pull of {adapter.source_url} without a blob")
        return blob.digest

    async def _pin(self, address: str, holder: str, digest: str) -> None:
        try:
            await self._storage(address).PinBlobs(storage_pb2.PinBlobsRequest(holder=holder, digests=[digest]),
                                                  metadata=self._metadata, timeout=10)
        except grpc.aio.AioRpcError as err:
            raise from_rpc_error(err) from None

    async def _unpin(self, address: str, holder: str, digest: str) -> None:
        try:
            await self._storage(address).UnpinBlobs(storage_pb2.UnpinBlobsRequest(holder=holder, digests=[digest]),
                                                    metadata=self._metadata, timeout=10)
        except grpc.aio.AioRpcError as err:
            log.warning("unpinning %s for %s failed: %s", digest, holder, err.code().name)

    async def _note(self, adapter: adapters_pb2.Adapter, message: str, digest: str = "") -> None:
        """Record the outcome on the adapter (its digest once pulled, the last failure), if it still exists."""
        key = self._state.key(adapter_key(adapter.deployment, adapter.name))
        current = await self._state.get(key, adapters_pb2.Adapter)
        if current is None or current.value.source_url != adapter.source_url:
            return
        updated = adapters_pb2.Adapter()
        updated.CopyFrom(current.value)
        updated.message = message
        if digest and not updated.digest:
            updated.digest = digest
        if updated != current.value:
            await self._state.update(key, updated, current.mod_revision, fence=self._fence)
