"""The etcd state layer: typed protobuf values, compare-and-swap writes, leases, and prefix caches.

Everything Clowder knows about the cluster lives in etcd under one prefix; this
module is the only place that talks to it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import random
from typing import AsyncIterator, Awaitable, Callable, Generic, Iterable, TypeVar

import aetcd
import aetcd.exceptions
from google.protobuf.message import DecodeError, Message

from clowder_common.errors import AlreadyExists, Unavailable
from clowder_common.tasks import cancel_and_wait

log = logging.getLogger(__name__)

M = TypeVar("M", bound=Message)

# A single etcd call never waits longer than this; a dead etcd must not hang a request.
CALL_TIMEOUT_S = 5


@dataclasses.dataclass(frozen=True)
class Versioned(Generic[M]):
    """A value with the revisions a compare-and-swap needs."""

    key: str
    value: M
    mod_revision: int
    create_revision: int


@dataclasses.dataclass(frozen=True)
class WatchEvent(Generic[M]):
    key: str
    # None for a deletion.
    value: M | None
    mod_revision: int


def _parse(cls: type[M], key: str, raw: bytes) -> M | None:
    msg = cls()
    try:
        msg.ParseFromString(raw)
    except DecodeError:
        # One corrupt value must not take down every reader of the prefix.
        log.warning("skipping undecodable value at %s", key)
        return None
    return msg


class EtcdState:
    """A connection to etcd, scoped to Clowder's key prefix."""

    def __init__(self, endpoints: Iterable[str], prefix: str = "/clowder/") -> None:
        self._endpoints = [e.strip() for e in endpoints if e.strip()]
        if not self._endpoints:
            raise ValueError("no etcd endpoints given")
        self.prefix = prefix if prefix.endswith("/") else prefix + "/"
        self._client: aetcd.Client | None = None

    @property
    def client(self) -> aetcd.Client:
        if self._client is None:
            raise Unavailable("etcd client is not connected")
        return self._client

    async def connect(self) -> None:
        last: Exception | None = None
        for endpoint in self._endpoints:
            host, _, port = endpoint.removeprefix("http://").rpartition(":")
            client = aetcd.Client(host=host or "127.0.0.1", port=int(port), timeout=CALL_TIMEOUT_S)
            try:
                await client.connect()
                await client.get(b"/clowder-connect-probe")
            except Exception as exc:  # try the next endpoint
                last = exc
                with contextlib.suppress(Exception):
                    await client.close()
                continue
            self._client = client
            return
        raise Unavailable(f"cannot reach etcd at {', '.join(self._endpoints)}: {last}")

    async def close(self) -> None:
        if self._client is not None:
            client, self._client = self._client, None
            with contextlib.suppress(Exception):
                await client.close()

    def key(self, *parts: str) -> str:
        return self.prefix + "/".join(parts)

    # -- reads -----------------------------------------------------------------

    async def get(self, key: str, cls: type[M]) -> Versioned[M] | None:
        try:
            result = await self.client.get(key.encode())
        except aetcd.exceptions.ClientError as exc:
            raise Unavailable(f"etcd get failed: {exc}", retry_after=1.0) from exc
        if result is None:
            return None
        value = _parse(cls, key, result.value)
        if value is None:
            return None
        return Versioned(key, value, result.mod_revision, result.create_revision)

    async def list(self, prefix: str, cls: type[M]) -> tuple[list[Versioned[M]], int]:
        """All values under `prefix` sorted by key, with the store revision of the read."""
        try:
            result = await self.client.get_prefix(prefix.encode(), sort_order="ascend", sort_target="key")
        except aetcd.exceptions.ClientError as exc:
            raise Unavailable(f"etcd range failed: {exc}", retry_after=1.0) from exc
        items = []
        for kv in result:
            key = kv.key.decode()
            value = _parse(cls, key, kv.value)
            if value is not None:
                items.append(Versioned(key, value, kv.mod_revision, kv.create_revision))
        return items, result.header.revision

    # -- writes ----------------------------------------------------------------

    async def put(self, key: str, value: Message, lease: int | None = None) -> int:
        """Unconditional write; returns the new revision."""
        try:
            result = await self.client.put(key.encode(), value.SerializeToString(), lease=lease)
        except aetcd.exceptions.ClientError as exc:
            raise Unavailable(f"etcd put failed: {exc}", retry_after=1.0) from exc
        return result.header.revision

    async def _txn(self, compare, success) -> bool:
        try:
            succeeded, _ = await self.client.transaction(compare=compare, success=success, failure=[])
        except aetcd.exceptions.ClientError as exc:
            raise Unavailable(f"etcd transaction failed: {exc}", retry_after=1.0) from exc
        return bool(succeeded)

    async def create(self, key: str, value: Message, lease: int | None = None) -> None:
        """Write only if the key does not exist (create_revision == 0)."""
        tx = self.client.transactions
        ok = await self._txn(
            [tx.create(key.encode()) == 0],
            [tx.put(key.encode(), value.SerializeToString(), lease=lease)],
        )
        if not ok:
            raise AlreadyExists(f"{key.removeprefix(self.prefix)} already exists", metadata={"key": key})

    async def update(self, key: str, value: Message, mod_revision: int, lease: int | None = None) -> bool:
        """Write only if nobody changed the key since `mod_revision`; False when someone did."""
        tx = self.client.transactions
        return await self._txn(
            [tx.mod(key.encode()) == mod_revision],
            [tx.put(key.encode(), value.SerializeToString(), lease=lease)],
        )

    async def delete(self, key: str, mod_revision: int | None = None) -> bool:
        """Delete the key; with `mod_revision`, only if it is still the version we read."""
        tx = self.client.transactions
        compare = [tx.mod(key.encode()) == mod_revision] if mod_revision else [tx.version(key.encode()) > 0]
        return await self._txn(compare, [tx.delete(key.encode())])

    async def delete_prefix(self, prefix: str) -> None:
        try:
            await self.client.delete_prefix(prefix.encode())
        except aetcd.exceptions.ClientError as exc:
            raise Unavailable(f"etcd delete failed: {exc}", retry_after=1.0) from exc

    # -- leases ----------------------------------------------------------------

    async def grant_lease(self, ttl: int) -> int:
        try:
            lease = await self.client.lease(ttl)
        except aetcd.exceptions.ClientError as exc:
            raise Unavailable(f"etcd lease grant failed: {exc}", retry_after=1.0) from exc
        return lease.id

    async def refresh_lease(self, lease_id: int) -> int:
        """Returns the remaining TTL; 0 means the lease is gone."""
        reply = await self.client.refresh_lease(lease_id)
        return int(reply.TTL) if reply is not None else 0

    async def revoke_lease(self, lease_id: int) -> None:
        with contextlib.suppress(Exception):
            await self.client.revoke_lease(lease_id)

    # -- watches ---------------------------------------------------------------

    async def watch(self, prefix: str, cls: type[M], start_revision: int) -> AsyncIterator[WatchEvent[M]]:
        """Events under `prefix` from `start_revision` on; raises when the watch breaks."""
        watch = await self.client.watch_prefix(prefix.encode(), start_revision=start_revision)
        try:
            async for event in watch:
                key = event.kv.key.decode()
                if event.kind == "DELETE":
                    yield WatchEvent(key, None, event.kv.mod_revision)
                else:
                    value = _parse(cls, key, event.kv.value)
                    if value is not None:
                        yield WatchEvent(key, value, event.kv.mod_revision)
        finally:
            with contextlib.suppress(Exception):
                await watch.cancel()


class LeaseKeeper:
    """Holds a lease alive and re-creates what hangs on it if the lease is ever lost.

    `register(lease_id)` writes the keys that live on the lease; it runs at start
    and again after etcd forgot the lease (an outage longer than the TTL), so a
    node or endpoint reappears by itself once etcd is back.
    """

    def __init__(self, state: EtcdState, ttl: int, register: Callable[[int], Awaitable[None]]) -> None:
        self._state = state
        self._ttl = max(2, ttl)
        self._register = register
        self.lease_id: int | None = None
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        self.lease_id = await self._state.grant_lease(self._ttl)
        await self._register(self.lease_id)
        self._task = asyncio.create_task(self._keep_alive(), name="lease-keepalive")

    async def _keep_alive(self) -> None:
        interval = self._ttl / 3
        while True:
            await asyncio.sleep(interval)
            try:
                if self.lease_id is None or await self._state.refresh_lease(self.lease_id) <= 0:
                    log.warning("lease lost; registering again")
                    self.lease_id = await self._state.grant_lease(self._ttl)
                    await self._register(self.lease_id)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # etcd down: keep trying, the TTL decides
                log.warning("lease refresh failed: %s", exc)

    async def stop(self) -> None:
        """Stop refreshing and revoke, so what hangs on the lease disappears at once."""
        await cancel_and_wait(self._task)
        self._task = None
        if self.lease_id is not None:
            await self._state.revoke_lease(self.lease_id)
            self.lease_id = None


class PrefixCache(Generic[M]):
    """A local copy of everything under a prefix: read it, then watch from that read's revision.

    Any watch failure (etcd restart, compaction) rebuilds the copy from a fresh read,
    so readers never see a stale cache for longer than the outage.
    """

    def __init__(
        self,
        state: EtcdState,
        prefix: str,
        cls: type[M],
        on_change: Callable[[], None] | None = None,
    ) -> None:
        self._state = state
        self._prefix = prefix
        self._cls = cls
        self._on_change = on_change
        self.items: dict[str, M] = {}
        self._ready = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._changed = asyncio.Condition()

    async def start(self, wait: float = CALL_TIMEOUT_S) -> None:
        self._task = asyncio.create_task(self._run(), name=f"cache {self._prefix}")
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._ready.wait(), wait)

    async def stop(self, timeout: float = 3.0) -> None:
        """Cancel the watch; bounded, because aetcd can wait forever for a watch cancelled mid-creation."""
        if self._task is not None:
            task, self._task = self._task, None
            task.cancel()
            done, _ = await asyncio.wait({task}, timeout=timeout)
            if not done:
                log.warning("watch on %s did not stop within %.0fs; the client's close releases it",
                            self._prefix, timeout)

    @property
    def ready(self) -> bool:
        return self._ready.is_set()

    def values(self) -> list[M]:
        return list(self.items.values())

    async def wait_for_change(self, timeout: float) -> None:
        async with self._changed:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._changed.wait(), timeout)

    async def _notify(self) -> None:
        if self._on_change is not None:
            self._on_change()
        async with self._changed:
            self._changed.notify_all()

    async def _run(self) -> None:
        backoff = 0.2
        while True:
            try:
                items, revision = await self._state.list(self._prefix, self._cls)
                self.items = {item.key: item.value for item in items}
                self._ready.set()
                await self._notify()
                backoff = 0.2
                async for event in self._state.watch(self._prefix, self._cls, revision + 1):
                    if event.value is None:
                        self.items.pop(event.key, None)
                    else:
                        self.items[event.key] = event.value
                    await self._notify()
                # A watch that ends without an error was cancelled under us: rebuild.
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("watch on %s broke (%s); rebuilding", self._prefix, exc)
            await asyncio.sleep(backoff + random.uniform(0, backoff))
            backoff = min(backoff * 2, 5.0)
