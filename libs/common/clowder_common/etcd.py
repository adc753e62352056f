"""The etcd state layer: typed protobuf values, compare-and-swap writes, leases, and prefix caches.

Everything Clowder knows about the cluster lives in etcd under one prefix; this
module is the only place that talks to it: callers use EtcdState's methods (typed reads and writes,
compare-and-put, claims, leases, watches) and never see aetcd's client or transaction builders.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import dataclasses
import ipaddress
import logging
import random
import socket
import time
from typing import AsyncIterator, Awaitable, Callable, Generic, Iterable, Sequence, TypeVar

import aetcd
import aetcd.exceptions
import aetcd.rpc
import aetcd.watcher
import grpc
from google.protobuf.message import DecodeError, Message

from clowder_common.errors import AlreadyExists, FailedPrecondition, Unavailable
from clowder_common.security import Tls
from clowder_common.tasks import bounded, cancel_and_wait, wait_event

log = logging.getLogger(__name__)

M = TypeVar("M", bound=Message)

# A single etcd call never waits longer than this; a dead etcd must not hang a request.
CALL_TIMEOUT_S = 5
# Closing a client (and cancelling a watch) gives up after this long: aetcd's watcher shutdown waits on a
# bounded queue and a grpc stream cancellation, either of which can block on a stopped etcd.
CLOSE_TIMEOUT_S = 5.0

# One grpc channel to every member (pick_first over all their addresses): when the member in use dies the
# channel moves to the next one by itself, and watches and lease keep-alives, which reopen their streams on the
# same channel, follow. Reconnection backoff is capped low so an etcd that comes back is used within about a
# second, not after grpc's default of up to two minutes; a connection attempt may take 5 s (grpc's
# "min_reconnect_backoff" is that bound: a busy etcd that just started can need seconds to send its first
# frame); keepalive pings (no more often than etcd's 5 s minimum) find a member that stopped answering on a
# connection that is still open (SIGSTOP, a dead link).
CHANNEL_OPTIONS = {
    "grpc.lb_policy_name": "pick_first",
    "grpc.initial_reconnect_backoff_ms": 200,
    "grpc.min_reconnect_backoff_ms": 5000,
    "grpc.max_reconnect_backoff_ms": 1000,
    "grpc.keepalive_time_ms": 10_000,
    "grpc.keepalive_timeout_ms": 5_000,
}


class LeadershipLost(FailedPrecondition):
    """A fenced write found the leader key no longer ours: a deposed leader must not change anything."""


@dataclasses.dataclass(frozen=True)
class Fence:
    """Makes a transaction apply only while its writer still holds a leadership key.

    The leader key's create_revision identifies one term of one leader: a new
    leader (even the same controller elected again) creates the key anew, so a
    write from an older term fails in the same round trip instead of being done.
    An empty key fences nothing (tests and tools that write outside any election).
    """

    key: str = ""
    create_revision: int = 0

    def compares(self, tx) -> list:
        return [tx.create(self.key.encode()) == self.create_revision] if self.key else []

    def checks(self, tx) -> list:
        """Failure ops that read the leader key, for `held` to look at."""
        return [tx.get(self.key.encode())] if self.key else []

    def held(self, response) -> bool:
        """Whether a failure op from `checks` shows the key still ours."""
        return bool(response) and response[0][1].create_revision == self.create_revision


UNFENCED = Fence()


def _split_endpoint(endpoint: str) -> tuple[str, int]:
    rest = endpoint.strip().removeprefix("http://").removeprefix("https://").rstrip("/")
    host, _, port = rest.rpartition(":")
    return (host.strip("[]") or "127.0.0.1"), int(port)


async def grpc_target(endpoints: list[str]) -> str:
    """One grpc target naming every member's addresses ("ipv4:a:p,b:q"); names are resolved now.

    grpc resolves a `dns:` target to one name only, so several members given by
    name are resolved here, once per connect.
    """
    loop = asyncio.get_running_loop()
    v4: list[str] = []
    v6: list[str] = []
    for endpoint in endpoints:
        host, port = _split_endpoint(endpoint)
        try:
            literal = ipaddress.ip_address(host)
            addresses: list[tuple[int, str]] = [(literal.version, str(literal))]
        except ValueError:
            try:
                infos = await bounded(loop.getaddrinfo(host, port, type=socket.SOCK_STREAM), CALL_TIMEOUT_S)
            except (OSError, TimeoutError) as exc:
                log.warning("cannot resolve etcd endpoint %s: %s", endpoint, exc)
                continue
            addresses = [(6 if info[0] == socket.AF_INET6 else 4, str(info[4][0])) for info in infos]
        for version, address in addresses:
            if version == 4 and f"{address}:{port}" not in v4:
                v4.append(f"{address}:{port}")
            elif version == 6 and f"[{address}]:{port}" not in v6:
                v6.append(f"[{address}]:{port}")
    # A grpc target holds one address family; IPv4 wins when both exist (loopback names resolve to both).
    if v4:
        return "ipv4:" + ",".join(v4)
    if v6:
        return "ipv6:" + ",".join(v6)
    raise Unavailable(f"no etcd endpoint resolves: {', '.join(endpoints)}", retry_after=1.0)


@dataclasses.dataclass(frozen=True)
class Versioned(Generic[M]):
    """A value with the revisions a compare-and-swap needs."""

    key: str
    value: M
    mod_revision: int
    create_revision: int


@dataclasses.dataclass(frozen=True)
class Stored:
    """The raw bytes at a key with their revisions and lease (0: none)."""

    data: bytes
    mod_revision: int
    create_revision: int
    lease: int = 0


@dataclasses.dataclass(frozen=True)
class Swap:
    """What a compare_and_put did."""

    done: bool
    # Not done: what the key holds now (None when absent), read in the same round trip, so a retry
    # can compare against it without a second read.
    current: Stored | None = None
    # Not done because the key named by `while_present` no longer exists.
    orphaned: bool = False


def _stored(response: list) -> Stored | None:
    """The first key-value of a range response inside a transaction ([] when the key is absent)."""
    if not response:
        return None
    value, meta = response[0]
    return Stored(value, meta.mod_revision, meta.create_revision, meta.lease)


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


async def _close_client(client: aetcd.Client) -> None:
    """Close without hanging: a client whose watch stream is stuck can otherwise wait forever in close()."""
    closing = asyncio.ensure_future(client.close())
    done, _ = await asyncio.wait({closing}, timeout=CLOSE_TIMEOUT_S)
    if not done:
        closing.cancel()
        log.warning("closing the etcd client took longer than %.0fs; abandoned", CLOSE_TIMEOUT_S)
        return
    if not closing.cancelled() and closing.exception() is not None:
        log.debug("closing the etcd client: %s", closing.exception())


class _TlsClient(aetcd.Client):
    """aetcd's client over TLS (aetcd itself dials only in plaintext): the same stubs on a secure channel.

    `server_name` is the name etcd's certificate is checked against: the target names addresses, not a host.
    """

    def __init__(self, *args, credentials: grpc.ChannelCredentials, server_name: str, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._credentials = credentials
        self._options = {**self._options, "grpc.ssl_target_name_override": server_name}  # type: ignore[has-type]

    async def connect(self) -> None:
        if self._connected.is_set():
            return
        self.channel = grpc.aio.secure_channel(f"{self._host}:{self._port}", self._credentials,
                                               options=list(self._options.items()))
        self.kvstub = aetcd.rpc.KVStub(self.channel)
        self.clusterstub = aetcd.rpc.ClusterStub(self.channel)
        self.leasestub = aetcd.rpc.LeaseStub(self.channel)
        self.maintenancestub = aetcd.rpc.MaintenanceStub(self.channel)
        self._watcher = aetcd.watcher.Watcher(aetcd.rpc.WatchStub(self.channel), timeout=self._timeout,
                                              metadata=self.metadata)
        self._connected.set()


class EtcdState:
    """A connection to etcd, scoped to Clowder's key prefix."""

    def __init__(self, endpoints: Iterable[str], prefix: str = "/clowder/", tls: Tls | None = None) -> None:
        self._endpoints = [e.strip() for e in endpoints if e.strip()]
        if not self._endpoints:
            raise ValueError("no etcd endpoints given")
        self.prefix = prefix if prefix.endswith("/") else prefix + "/"
        # With a CA: TLS to etcd, presenting the client certificate when one is given (etcd --client-cert-auth).
        self._tls = tls if tls is not None and tls.ca else None
        self._client: aetcd.Client | None = None

    @property
    def _kv(self) -> aetcd.Client:
        """The connected client. Private on purpose: callers say what they want of etcd through the methods
        below (add one here when a new kind of access is needed), never through aetcd's own types."""
        if self._client is None:
            raise Unavailable("etcd client is not connected")
        return self._client

    @property
    def connected(self) -> bool:
        return self._client is not None

    async def connect(self) -> None:
        """One channel to all members; fails unless some member answers a read now."""
        target = await grpc_target(self._endpoints)
        # aetcd builds its target as f"{host}:{port}": hand it the multi-address target split at its last colon.
        host, _, port = target.rpartition(":")
        if self._tls is not None:
            credentials = self._tls.channel_credentials()
            assert credentials is not None
            client: aetcd.Client = _TlsClient(
                host=host, port=int(port), timeout=CALL_TIMEOUT_S, options=dict(CHANNEL_OPTIONS),
                credentials=credentials, server_name=_split_endpoint(self._endpoints[0])[0])
        else:
            client = aetcd.Client(host=host, port=int(port), timeout=CALL_TIMEOUT_S, options=dict(CHANNEL_OPTIONS))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + CALL_TIMEOUT_S
        while True:
            # A member that just started may refuse the first attempt; keep trying for one call timeout.
            try:
                await bounded(client.connect(), CALL_TIMEOUT_S)
                await bounded(client.get(b"/clowder-connect-probe"), max(0.5, deadline - loop.time()))
                break
            except Exception as exc:
                if loop.time() + 0.2 >= deadline:
                    await _close_client(client)
                    raise Unavailable(f"cannot reach etcd at {', '.join(self._endpoints)}: {exc}",
                                      retry_after=1.0) from exc
                await asyncio.sleep(0.2)
        self._client = client

    async def close(self) -> None:
        if self._client is not None:
            client, self._client = self._client, None
            await _close_client(client)

    async def ping(self, timeout: float = 2.0) -> bool:
        """Whether etcd answers a linearizable read (so a quorum is up) within `timeout`."""
        try:
            await bounded(self._kv.get((self.prefix + "-ping").encode()), timeout)
        except asyncio.CancelledError:
            raise
        except Exception:
            return False
        return True

    def key(self, *parts: str) -> str:
        return self.prefix + "/".join(parts)

    # -- reads -----------------------------------------------------------------

    async def get(self, key: str, cls: type[M]) -> Versioned[M] | None:
        stored = await self.get_raw(key)
        if stored is None:
            return None
        value = _parse(cls, key, stored.data)
        if value is None:
            return None
        return Versioned(key, value, stored.mod_revision, stored.create_revision)

    async def list(self, prefix: str, cls: type[M]) -> tuple[list[Versioned[M]], int]:
        """All values under `prefix` sorted by key, with the store revision of the read."""
        try:
            result = await self._kv.get_prefix(prefix.encode(), sort_order="ascend", sort_target="key")
        except aetcd.exceptions.ClientError as exc:
            raise Unavailable(f"etcd range failed: {exc}", retry_after=1.0) from exc
        items = []
        for kv in result:
            key = kv.key.decode()
            value = _parse(cls, key, kv.value)
            if value is not None:
                items.append(Versioned(key, value, kv.mod_revision, kv.create_revision))
        return items, result.header.revision

    async def get_raw(self, key: str) -> Stored | None:
        """The undecoded bytes at `key`: for compare-and-swap on exact bytes, and for values of any type."""
        try:
            result = await self._kv.get(key.encode())
        except aetcd.exceptions.ClientError as exc:
            raise Unavailable(f"etcd get failed: {exc}", retry_after=1.0) from exc
        if result is None:
            return None
        return Stored(result.value, result.mod_revision, result.create_revision, result.lease)

    async def list_keys(self, prefix: str) -> builtins.list[str]:
        """The keys under `prefix`, sorted; no values travel."""
        try:
            result = await self._kv.get_prefix(prefix.encode(), keys_only=True, sort_order="ascend",
                                               sort_target="key")
        except aetcd.exceptions.ClientError as exc:
            raise Unavailable(f"etcd range failed: {exc}", retry_after=1.0) from exc
        return [kv.key.decode() for kv in result]

    # -- writes ----------------------------------------------------------------

    async def put(self, key: str, value: Message, lease: int | None = None) -> int:
        """Unconditional write; returns the new revision."""
        try:
            result = await self._kv.put(key.encode(), value.SerializeToString(), lease=lease)
        except aetcd.exceptions.ClientError as exc:
            raise Unavailable(f"etcd put failed: {exc}", retry_after=1.0) from exc
        return result.header.revision

    async def put_many(self, items: Sequence[tuple[str, bytes, int | None]]) -> None:
        """Unconditional writes of (key, bytes, lease or None) in one transaction (etcd caps its size, 128
        operations by default: callers split bigger batches)."""
        tx = self._kv.transactions
        await self._transaction([], [tx.put(k.encode(), v, lease=lease) for k, v, lease in items], [])

    async def compare_and_put(self, key: str, data: bytes, *, expect_value: bytes | None = None,
                              expect_mod_revision: int | None = None, while_present: str = "",
                              lease: int | None = None, fence: Fence = UNFENCED) -> Swap:
        """Write `data` only if the key still holds `expect_value` (its exact bytes) or was last changed at
        `expect_mod_revision` (0: the key is absent), and, with `while_present`, only while that key exists.

        One round trip either way: a lost compare returns what the key holds now. Exactly one expectation.
        """
        if (expect_value is None) == (expect_mod_revision is None):
            raise ValueError("compare_and_put takes exactly one of expect_value and expect_mod_revision")
        tx = self._kv.transactions
        raw = key.encode()
        compare = [tx.value(raw) == expect_value] if expect_value is not None else [tx.mod(raw) == expect_mod_revision]
        failure = [tx.get(raw)]
        if while_present:
            compare.append(tx.version(while_present.encode()) > 0)
            failure.append(tx.get(while_present.encode()))
        ok, responses = await self._transaction(compare, [tx.put(raw, data, lease=lease)], failure, fence)
        if ok:
            return Swap(True)
        return Swap(False, _stored(responses[0]), orphaned=bool(while_present) and not responses[1])

    async def claim(self, key: str, value: Message, lease: int) -> Fence | None:
        """Create `key` on `lease` unless it exists: the new term's Fence (its create_revision, read in the same
        transaction), or None when the key is someone else's."""
        tx = self._kv.transactions
        raw = key.encode()
        won, responses = await self._transaction(
            [tx.create(raw) == 0], [tx.put(raw, value.SerializeToString(), lease=lease), tx.get(raw)], [])
        if not won:
            return None
        return Fence(key, responses[1][0][1].create_revision)

    async def put_if_absent(self, key: str, value: Message, others: Iterable[str] = ()) -> bool:
        """Write `key` only if neither it nor any key in `others` exists; True when this wrote it."""
        tx = self._kv.transactions
        compare = [tx.create(k.encode()) == 0 for k in (key, *others)]
        ok, _ = await self._transaction(compare, [tx.put(key.encode(), value.SerializeToString())], [])
        return ok

    async def _transaction(self, compare: builtins.list, success: builtins.list, failure: builtins.list,
                           fence: Fence = UNFENCED) -> tuple[bool, builtins.list]:
        """One round trip; with a fence, also compares the leader key and raises LeadershipLost when it is gone.

        The fence's read is appended to `failure`, so the responses returned are
        those of the caller's own failure ops.
        """
        tx = self._kv.transactions
        try:
            ok, responses = await self._kv.transaction(
                compare=compare + fence.compares(tx), success=success, failure=failure + fence.checks(tx))
        except aetcd.exceptions.ClientError as exc:
            raise Unavailable(f"etcd transaction failed: {exc}", retry_after=1.0) from exc
        if ok:
            return True, responses
        if fence.key:
            if not fence.held(responses[-1]):
                raise LeadershipLost(f"leadership ({fence.key}) was lost; the write was not done")
            responses = responses[:-1]
        return False, responses

    async def holds(self, fence: Fence) -> bool:
        """Whether the fence's key is still the one its term created (always True for an empty fence)."""
        if not fence.key:
            return True
        try:
            current = await self._kv.get(fence.key.encode())
        except aetcd.exceptions.ClientError as exc:
            raise Unavailable(f"etcd get failed: {exc}", retry_after=1.0) from exc
        return current is not None and current.create_revision == fence.create_revision

    async def _txn(self, compare, success, fence: Fence) -> bool:
        ok, _ = await self._transaction(compare, success, [], fence)
        return ok

    async def create(self, key: str, value: Message, lease: int | None = None, fence: Fence = UNFENCED) -> None:
        """Write only if the key does not exist (create_revision == 0)."""
        tx = self._kv.transactions
        ok = await self._txn(
            [tx.create(key.encode()) == 0],
            [tx.put(key.encode(), value.SerializeToString(), lease=lease)],
            fence,
        )
        if not ok:
            raise AlreadyExists(f"{key.removeprefix(self.prefix)} already exists", metadata={"key": key})

    async def update(self, key: str, value: Message, mod_revision: int, lease: int | None = None,
                     fence: Fence = UNFENCED) -> bool:
        """Write only if nobody changed the key since `mod_revision`; False when someone did."""
        tx = self._kv.transactions
        return await self._txn(
            [tx.mod(key.encode()) == mod_revision],
            [tx.put(key.encode(), value.SerializeToString(), lease=lease)],
            fence,
        )

    async def delete(self, key: str, mod_revision: int | None = None, fence: Fence = UNFENCED) -> bool:
        """Delete the key; with `mod_revision`, only if it is still the version we read."""
        tx = self._kv.transactions
        compare = [tx.mod(key.encode()) == mod_revision] if mod_revision else [tx.version(key.encode()) > 0]
        return await self._txn(compare, [tx.delete(key.encode())], fence)

    async def delete_prefix(self, prefix: str) -> None:
        try:
            await self._kv.delete_prefix(prefix.encode())
        except aetcd.exceptions.ClientError as exc:
            raise Unavailable(f"etcd delete failed: {exc}", retry_after=1.0) from exc

    # -- leases ----------------------------------------------------------------

    async def grant_lease(self, ttl: int) -> int:
        try:
            lease = await self._kv.lease(ttl)
        except aetcd.exceptions.ClientError as exc:
            raise Unavailable(f"etcd lease grant failed: {exc}", retry_after=1.0) from exc
        return lease.id

    async def refresh_lease(self, lease_id: int) -> int:
        """Returns the remaining TTL; 0 means the lease is gone."""
        try:
            # The keep-alive stream carries aetcd's deadline; the outer bound covers its stream set-up too.
            reply = await bounded(self._kv.refresh_lease(lease_id), CALL_TIMEOUT_S + 1)
        except (aetcd.exceptions.ClientError, TimeoutError) as exc:
            raise Unavailable(f"etcd lease refresh failed: {exc}", retry_after=1.0) from exc
        return int(reply.TTL) if reply is not None else 0

    async def revoke_lease(self, lease_id: int) -> None:
        with contextlib.suppress(Exception):
            await bounded(self._kv.revoke_lease(lease_id), CALL_TIMEOUT_S + 1)

    # -- watches ---------------------------------------------------------------

    async def watch(self, prefix: str, cls: type[M], start_revision: int) -> AsyncIterator[WatchEvent[M]]:
        """Events under `prefix` from `start_revision` on; raises when the watch breaks.

        No event for a long time is not an error (a paused etcd sends nothing): readers that need to know
        whether etcd answers ask `ping` or an AnsweringClock.
        """
        try:
            # aetcd bounds the create itself, but waits unbounded for its watcher's lock and request queue.
            watch = await bounded(self._kv.watch_prefix(prefix.encode(), start_revision=start_revision),
                                  CALL_TIMEOUT_S * 2)
        except TimeoutError as exc:
            raise Unavailable(f"etcd watch on {prefix} was not created in time", retry_after=1.0) from exc
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
            # Cancelling puts a request on aetcd's bounded queue, which blocks when the stream is stuck.
            with contextlib.suppress(Exception):
                await bounded(watch.cancel(), CLOSE_TIMEOUT_S)


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
        # After a failure, try again soon: the first answer after an outage should re-register at once.
        retry = min(interval, 1.0)
        delay = interval
        while True:
            await asyncio.sleep(delay)
            try:
                if self.lease_id is None or await self._state.refresh_lease(self.lease_id) <= 0:
                    log.warning("lease lost; registering again")
                    self.lease_id = None
                    lease_id = await self._state.grant_lease(self._ttl)
                    try:
                        await self._register(lease_id)
                    except BaseException:
                        await self._state.revoke_lease(lease_id)
                        raise
                    self.lease_id = lease_id
                delay = interval
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # etcd down: keep trying, the TTL decides
                log.warning("lease refresh failed: %s", exc)
                delay = retry

    async def stop(self) -> None:
        """Stop refreshing and revoke, so what hangs on the lease disappears at once."""
        await cancel_and_wait(self._task)
        self._task = None
        if self.lease_id is not None:
            await self._state.revoke_lease(self.lease_id)
            self.lease_id = None


class AnsweringClock:
    """Seconds during which etcd answered, as seen by this process: a clock that stops while etcd is away.

    A lease that expired while etcd was paused or unreachable says nothing about
    the process that held it, so absences are timed on this clock: it advances by
    the time between two successful probes only (a failed or slow probe stops it
    until the next success).
    """

    def __init__(self, state: EtcdState, interval_s: float = 1.0, timeout_s: float = 2.0) -> None:
        self._state = state
        self._interval = interval_s
        self._timeout = timeout_s
        self._seconds = 0.0
        self._last_ok: float | None = None
        self._task: asyncio.Task | None = None

    def now(self) -> float:
        return self._seconds

    @property
    def answering(self) -> bool:
        """Whether the latest probe succeeded."""
        return self._last_ok is not None

    async def probe(self) -> bool:
        """One probe; advances the clock when this one and the previous one both succeeded."""
        ok = await self._state.ping(self._timeout)
        now = time.monotonic()
        if not ok:
            self._last_ok = None
            return False
        if self._last_ok is not None:
            self._seconds += now - self._last_ok
        self._last_ok = now
        return True

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="etcd-answering-clock")

    async def stop(self) -> None:
        if self._task is not None:
            task, self._task = self._task, None
            task.cancel()
            await asyncio.wait({task}, timeout=CLOSE_TIMEOUT_S)
        self._last_ok = None

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(Exception):
                await self.probe()
            await asyncio.sleep(self._interval)


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
        await wait_event(self._ready, wait)

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
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._changed.wait()

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
