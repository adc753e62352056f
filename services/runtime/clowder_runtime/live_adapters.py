"""LoRA adapters loaded into and unloaded from a serving engine, and what the replica says it serves."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from typing import Awaitable, Callable, Protocol

from clowder.runtime.v1 import adapters_pb2

from clowder_common.errors import ClowderError, FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted
from clowder_common.keys import validate_name
from clowder_common.tasks import cancel_and_wait
from clowder_runtime.model_source import DIGEST_RE

log = logging.getLogger(__name__)

# How long an unloading adapter is still served after it stopped being listed: balancers learn of it
# through an etcd watch (at once) or a GetStats poll (every 0.5 s by default), and a request they routed
# meanwhile is served rather than bounced.
DEFAULT_UNLOAD_GRACE_S = 2.0
# How often an unload looks whether the requests still using the adapter have finished.
_IN_USE_POLL_S = 0.05


class AdapterEngine(Protocol):
    """The engine calls this module drives (LlamaEngine has them)."""

    async def load_adapter(self, name: str, path: str) -> None: ...

    def refuse_adapter(self, name: str) -> None: ...

    def adapter_in_use(self, name: str) -> bool: ...

    def drop_adapter(self, name: str) -> None: ...


class LiveAdapters:
    """The replica's adapters: the ones given at start (fixed) and the ones loaded while it serves.

    `publish` gets the listed adapters after every change (the etcd endpoint is rewritten with them);
    `resolve` turns a storage digest into the local path of the blob.
    """

    def __init__(self, engine: AdapterEngine, fixed: dict[str, str],
                 resolve: Callable[[str], Awaitable[str]] | None,
                 publish: Callable[[list[adapters_pb2.AdapterInfo]], Awaitable[None]] | None = None,
                 unload_grace_s: float = DEFAULT_UNLOAD_GRACE_S, max_adapters: int = 0) -> None:
        self._engine = engine
        self._max = max_adapters
        self._resolve = resolve
        self._publish = publish
        self._grace = unload_grace_s
        self._listed: dict[str, adapters_pb2.AdapterInfo] = {
            name: adapters_pb2.AdapterInfo(name=name, path=path, fixed=True) for name, path in fixed.items()
        }
        # Names being loaded (no second load of one name at the same time) and being unloaded.
        self._loading: set[str] = set()
        self._unloading: dict[str, asyncio.Task[None]] = {}
        self._closed = False

    def listed(self) -> list[adapters_pb2.AdapterInfo]:
        """Adapters requests may be routed here for, by name."""
        return [self._listed[name] for name in sorted(self._listed)]

    def names(self) -> list[str]:
        return sorted(self._listed)

    async def load(self, request: adapters_pb2.LoadAdapterRequest) -> tuple[adapters_pb2.AdapterInfo, bool]:
        """The adapter now listed, and whether this call loaded it (False: it already was, from this source)."""
        name = validate_name(request.name, "name")
        source = request.WhichOneof("source")
        if source == "digest":
            if not DIGEST_RE.match(request.digest):
                raise InvalidArgument(f"digest {request.digest[:80]!r} is not 'sha256:<64 lowercase hex>'",
                                      field="digest")
        elif source != "path" or not request.path:
            raise InvalidArgument("give the adapter's path or its storage digest", field="path")
        current = self._listed.get(name)
        if current is not None:
            if (source == "digest" and current.digest == request.digest) or (
                    source == "path" and not current.digest and current.path == request.path):
                return current, False
            raise InvalidArgument(f"adapter {name!r} is already loaded from another source; unload it first",
                                  field="name")
        if name in self._unloading:
            raise FailedPrecondition(f"adapter {name!r} is being unloaded; load it again once it is gone",
                                     reason="ADAPTER_UNLOADING")
        if name in self._loading:
            raise FailedPrecondition(f"adapter {name!r} is being loaded by another call", reason="ADAPTER_LOADING")
        held = len(self._listed) + len(self._loading) + len(self._unloading)
        if self._max and held >= self._max:
            raise ResourceExhausted(f"this replica holds {held} adapters, its most (max_adapters {self._max}); "
                                    "unload one first", reason="TOO_MANY_ADAPTERS")
        self._loading.add(name)
        try:
            if source == "digest":
                if self._resolve is None:
                    raise FailedPrecondition("this runtime has no storage to resolve digests; give a path",
                                             reason="NO_STORAGE")
                path = await self._resolve(request.digest)
            else:
                path = request.path
            if not os.path.isfile(path):
                raise InvalidArgument(f"adapter file {path} does not exist", field=source)
            try:
                await self._engine.load_adapter(name, path)
            except InvalidArgument as exc:
                # The engine names the file; the caller gave a digest or a path.
                raise InvalidArgument(exc.message, field=source, reason=exc.reason) from None
            info = adapters_pb2.AdapterInfo(name=name, path=path, digest=request.digest)
            self._listed[name] = info
        finally:
            self._loading.discard(name)
        log.info("adapter loaded name=%s path=%s digest=%s", name, info.path, info.digest or "-")
        await self._announce()
        return info, True

    async def unload(self, name: str) -> None:
        """Stop listing it, serve it a grace longer, refuse it, and free it once no request uses it."""
        task = self._unloading.get(name)
        if task is None:
            if name not in self._listed:
                raise NotFound(f"no adapter {name[:80]!r} is loaded", reason="ADAPTER_NOT_FOUND",
                               metadata={"adapter": name[:80]})
            # Unlisted at once (and published by the task), so a load of the same name meanwhile is refused.
            self._listed.pop(name)
            task = asyncio.create_task(self._unload(name), name=f"unload-adapter-{name}")
            self._unloading[name] = task
        # The unload goes on when the caller gives up waiting: the adapter is already unlisted.
        await asyncio.shield(task)

    async def _unload(self, name: str) -> None:
        try:
            await self._announce()
            await asyncio.sleep(self._grace)
            self._engine.refuse_adapter(name)
            while self._engine.adapter_in_use(name):
                await asyncio.sleep(_IN_USE_POLL_S)
            self._engine.drop_adapter(name)
            log.info("adapter unloaded name=%s", name)
        finally:
            self._unloading.pop(name, None)

    async def _announce(self) -> None:
        if self._publish is not None and not self._closed:
            try:
                await self._publish(self.listed())
            except ClowderError as exc:
                # The registration keeps trying by itself; what we serve does not wait for etcd.
                log.warning("publishing the adapters failed: %s", exc)

    async def close(self) -> None:
        """Stop unloads in progress (the engine goes away with the runtime)."""
        self._closed = True
        for task in list(self._unloading.values()):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await cancel_and_wait(task, timeout=5)
