"""The etcd state layer against a real etcd: CAS, leases, prefix caches that survive restarts."""

from __future__ import annotations

import asyncio
import time

import pytest

from clowder.controller.v1 import resources_pb2
from clowder_common.errors import AlreadyExists
from clowder_common.etcd import (UNFENCED, AnsweringClock, EtcdState, Fence, LeadershipLost, LeaseKeeper,
                                 PrefixCache)
from clowder_common.etcd_server import start_etcd, start_etcd_cluster


@pytest.mark.inprocess
async def test_create_refuses_existing_key(state):
    key = state.key("images", "smol")
    await state.create(key, resources_pb2.Image(alias="smol"))
    with pytest.raises(AlreadyExists):
        await state.create(key, resources_pb2.Image(alias="other"))
    got = await state.get(key, resources_pb2.Image)
    assert got is not None and got.value.alias == "smol"


@pytest.mark.inprocess
async def test_update_compares_mod_revision(state):
    key = state.key("deployments", "d")
    await state.create(key, resources_pb2.Deployment(name="d", replicas=1))
    first = await state.get(key, resources_pb2.Deployment)
    assert await state.update(key, resources_pb2.Deployment(name="d", replicas=2), first.mod_revision)
    # A writer holding the old revision loses.
    assert not await state.update(key, resources_pb2.Deployment(name="d", replicas=5), first.mod_revision)
    now = await state.get(key, resources_pb2.Deployment)
    assert now.value.replicas == 2


@pytest.mark.inprocess
async def test_delete_only_if_unchanged(state):
    key = state.key("deployments", "x")
    await state.create(key, resources_pb2.Deployment(name="x"))
    seen = await state.get(key, resources_pb2.Deployment)
    await state.put(key, resources_pb2.Deployment(name="x", replicas=3))
    assert not await state.delete(key, seen.mod_revision)
    assert await state.get(key, resources_pb2.Deployment) is not None
    assert await state.delete(key)
    assert await state.get(key, resources_pb2.Deployment) is None


@pytest.mark.inprocess
async def test_list_is_sorted_and_scoped(state):
    for name in ("b", "a", "c"):
        await state.put(state.key("nodes", name), resources_pb2.Node(name=name))
    await state.put(state.key("nodesx", "z"), resources_pb2.Node(name="z"))
    items, revision = await state.list(state.key("nodes", ""), resources_pb2.Node)
    assert [i.value.name for i in items] == ["a", "b", "c"]
    assert revision >= max(i.mod_revision for i in items)


@pytest.mark.inprocess
async def test_revoked_lease_removes_its_keys(state):
    key = state.key("nodes", "leased")

    async def register(lease_id: int) -> None:
        await state.put(key, resources_pb2.Node(name="leased"), lease=lease_id)

    keeper = LeaseKeeper(state, ttl=3, register=register)
    await keeper.start()
    await asyncio.sleep(3.5)  # longer than the TTL: the keeper must have refreshed it
    assert await state.get(key, resources_pb2.Node) is not None
    await keeper.stop()
    assert await state.get(key, resources_pb2.Node) is None


@pytest.mark.inprocess
async def test_prefix_cache_follows_changes(state):
    prefix = state.key("endpoints", "")
    await state.put(prefix + "d/1", resources_pb2.Node(name="one"))
    cache = PrefixCache(state, prefix, resources_pb2.Node)
    await cache.start()
    try:
        assert cache.ready and [n.name for n in cache.values()] == ["one"]
        await state.put(prefix + "d/2", resources_pb2.Node(name="two"))
        await state.delete(prefix + "d/1")
        for _ in range(50):
            if sorted(n.name for n in cache.values()) == ["two"]:
                break
            await cache.wait_for_change(0.1)
        assert sorted(n.name for n in cache.values()) == ["two"]
    finally:
        await cache.stop()


@pytest.mark.processes
async def test_prefix_cache_rebuilds_after_etcd_restart(tmp_path):
    proc = start_etcd(tmp_path / "data")
    port = proc.client_port
    state = EtcdState([proc.endpoint], "/restart/")
    await state.connect()
    await state.put("/restart/a", resources_pb2.Node(name="a"))
    cache = PrefixCache(state, "/restart/", resources_pb2.Node)
    await cache.start()
    try:
        proc.stop()
        proc = start_etcd(tmp_path / "data", client_port=port)
        # Written while the cache's watch was broken: only a rebuild can see it.
        for _ in range(100):
            try:
                await state.put("/restart/b", resources_pb2.Node(name="b"))
                break
            except Exception:
                await asyncio.sleep(0.1)
        for _ in range(100):
            if sorted(n.name for n in cache.values()) == ["a", "b"]:
                break
            await asyncio.sleep(0.1)
        assert sorted(n.name for n in cache.values()) == ["a", "b"]
    finally:
        await cache.stop()
        await state.close()
        proc.stop()


# -- compare-and-put, claims, raw reads ----------------------------------------------------------------------


@pytest.mark.inprocess
async def test_compare_and_put_on_bytes_returns_what_it_lost_to(state):
    key = state.key("replicas", "r")
    # Absent expected (mod revision 0): the first write creates, a second one with the same expectation loses.
    assert (await state.compare_and_put(key, b"one", expect_mod_revision=0)).done
    lost = await state.compare_and_put(key, b"two", expect_mod_revision=0)
    assert not lost.done and lost.current is not None and lost.current.data == b"one"
    # On exact bytes: a stale expectation loses and brings back the stored bytes to retry on.
    stale = await state.compare_and_put(key, b"three", expect_value=b"zero")
    assert not stale.done and stale.current.data == b"one" and not stale.orphaned
    assert (await state.compare_and_put(key, b"three", expect_value=stale.current.data)).done
    stored = await state.get_raw(key)
    assert stored is not None and stored.data == b"three" and stored.mod_revision > stored.create_revision
    # A compare on a key that is gone comes back with nothing to retry on.
    await state.delete(key)
    gone = await state.compare_and_put(key, b"four", expect_value=b"three")
    assert not gone.done and gone.current is None and await state.get_raw(key) is None
    with pytest.raises(ValueError):
        await state.compare_and_put(key, b"x")


@pytest.mark.inprocess
async def test_compare_and_put_while_present_says_orphaned(state):
    owner, key = state.key("deployments", "o"), state.key("events", "o")
    await state.put(owner, resources_pb2.Deployment(name="o"))
    assert (await state.compare_and_put(key, b"e1", expect_mod_revision=0, while_present=owner)).done
    await state.delete(owner)
    swap = await state.compare_and_put(key, b"e2", expect_value=b"e1", while_present=owner)
    assert not swap.done and swap.orphaned
    assert (await state.get_raw(key)).data == b"e1"


@pytest.mark.inprocess
async def test_claim_gives_the_term_fence_once(state):
    key = state.key("leader", "claimed")
    lease = await state.grant_lease(30)
    fence = await state.claim(key, resources_pb2.ControllerLeader(identity="a"), lease)
    assert fence is not None and fence.key == key and await state.holds(fence)
    held = await state.get_raw(key)
    assert held.create_revision == fence.create_revision and held.lease == lease
    assert await state.claim(key, resources_pb2.ControllerLeader(identity="b"), lease) is None
    got = await state.get(key, resources_pb2.ControllerLeader)
    assert got.value.identity == "a"
    await state.revoke_lease(lease)


@pytest.mark.inprocess
async def test_put_if_absent_needs_every_key_absent(state):
    ok, err = state.key("results", "1.ok"), state.key("results", "1.err")
    assert await state.put_if_absent(err, resources_pb2.Node(name="err"), others=[ok])
    assert not await state.put_if_absent(ok, resources_pb2.Node(name="ok"), others=[err])
    assert not await state.put_if_absent(err, resources_pb2.Node(name="again"))
    assert await state.get(ok, resources_pb2.Node) is None


@pytest.mark.inprocess
async def test_put_many_and_list_keys(state):
    lease = await state.grant_lease(30)
    items = [(state.key("bulk", n), resources_pb2.Node(name=n).SerializeToString(), lease if n == "b" else None)
             for n in ("c", "a", "b")]
    await state.put_many(items)
    assert await state.list_keys(state.key("bulk", "")) == [state.key("bulk", n) for n in ("a", "b", "c")]
    assert (await state.get_raw(state.key("bulk", "b"))).lease == lease
    assert (await state.get_raw(state.key("bulk", "a"))).lease == 0
    await state.revoke_lease(lease)
    assert await state.list_keys(state.key("bulk", "")) == [state.key("bulk", n) for n in ("a", "c")]


# -- fenced writes -------------------------------------------------------------------------------------------


async def _hold_leader_key(state) -> Fence:
    key = state.key("leader", "test")
    await state.create(key, resources_pb2.Node(name="me"))
    held = await state.get_raw(key)
    return Fence(key, held.create_revision)


@pytest.mark.inprocess
async def test_fenced_writes_apply_only_while_the_leader_key_is_ours(state):
    fence = await _hold_leader_key(state)
    key = state.key("deployments", "f")
    await state.create(key, resources_pb2.Deployment(name="f", replicas=1), fence=fence)
    seen = await state.get(key, resources_pb2.Deployment)
    assert await state.update(key, resources_pb2.Deployment(name="f", replicas=2), seen.mod_revision, fence=fence)
    # A compare-and-swap that loses to another writer is still a plain False under a held fence.
    assert not await state.update(key, resources_pb2.Deployment(name="f", replicas=9), seen.mod_revision,
                                  fence=fence)

    assert await state.holds(fence) and await state.holds(UNFENCED)

    # The key goes away and comes back (a new term: another create_revision): the old fence no longer holds.
    await state.delete(fence.key)
    await state.create(fence.key, resources_pb2.Node(name="someone else"))
    assert not await state.holds(fence)
    current = await state.get(key, resources_pb2.Deployment)
    with pytest.raises(LeadershipLost):
        await state.update(key, resources_pb2.Deployment(name="f", replicas=3), current.mod_revision, fence=fence)
    with pytest.raises(LeadershipLost):
        await state.create(state.key("deployments", "g"), resources_pb2.Deployment(name="g"), fence=fence)
    with pytest.raises(LeadershipLost):
        await state.delete(key, fence=fence)
    # None of them did anything.
    after = await state.get(key, resources_pb2.Deployment)
    assert after.value.replicas == 2 and after.mod_revision == current.mod_revision
    assert await state.get(state.key("deployments", "g"), resources_pb2.Deployment) is None


@pytest.mark.inprocess
async def test_unfenced_writes_ignore_leadership(state):
    key = state.key("deployments", "u")
    await state.create(key, resources_pb2.Deployment(name="u"), fence=UNFENCED)
    assert await state.delete(key, fence=UNFENCED)


# -- outages of one etcd -------------------------------------------------------------------------------------


@pytest.fixture
async def private_etcd(tmp_path):
    """An etcd of the test's own, to pause and restart without disturbing the other tests."""
    proc = start_etcd(tmp_path / "etcd", log_path=tmp_path / "etcd.log")
    state = EtcdState([proc.endpoint], "/private/")
    await state.connect()
    yield proc, state
    proc.resume()
    await state.close()
    proc.stop()


@pytest.mark.processes
async def test_answering_clock_stops_while_etcd_is_paused(private_etcd):
    proc, state = private_etcd
    clock = AnsweringClock(state, interval_s=0.2, timeout_s=0.5)
    clock.start()
    try:
        await asyncio.sleep(1.5)
        assert clock.answering and 0.8 < clock.now() < 1.6
        proc.pause()
        await asyncio.sleep(1.0)  # the probe in flight times out
        paused_at = clock.now()
        await asyncio.sleep(3.0)
        assert not clock.answering
        assert clock.now() - paused_at < 0.01
        proc.resume()
        await asyncio.sleep(2.0)
        assert clock.answering and clock.now() - paused_at > 0.8
    finally:
        await clock.stop()


@pytest.mark.processes
async def test_lease_keeper_registers_again_after_a_pause_longer_than_its_ttl(private_etcd):
    proc, state = private_etcd
    key = state.key("endpoints", "d", "r")
    registered = []

    async def register(lease_id: int) -> None:
        await state.put(key, resources_pb2.Node(name="r"), lease=lease_id)
        registered.append(lease_id)

    keeper = LeaseKeeper(state, ttl=2, register=register)
    await keeper.start()
    cache = PrefixCache(state, state.key("endpoints", ""), resources_pb2.Node)
    await cache.start()
    try:
        proc.pause()
        await asyncio.sleep(5)  # more than the TTL: etcd expires the lease as soon as it runs again
        proc.resume()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not (len(registered) == 2 and key in cache.items):
            await asyncio.sleep(0.1)
        assert len(registered) == 2 and registered[1] != registered[0]
        assert key in cache.items, "the cache follows the key's return"
        assert await state.get(key, resources_pb2.Node) is not None
    finally:
        await cache.stop()
        await keeper.stop()


@pytest.mark.processes
async def test_close_and_stop_are_bounded_while_etcd_is_paused(private_etcd):
    proc, state = private_etcd
    cache = PrefixCache(state, "/private/x/", resources_pb2.Node)
    await cache.start()
    proc.pause()
    started = time.monotonic()
    await cache.stop()
    await state.close()
    assert time.monotonic() - started < 15


# -- a three-member cluster ----------------------------------------------------------------------------------


async def _member_in_use(state, cluster) -> int:
    """Index of the member that answers this client (the response header names it)."""
    # Which member answered is below what the state layer exposes: this test of the layer looks at its client.
    client = state._kv
    reply = await client.get_prefix(b"/nothing-here/")
    by_url = {}
    async for member in client.members():
        for url in member.client_urls:
            by_url[url.removeprefix("http://")] = member.id
    ids = [by_url[m.endpoint] for m in cluster.members]
    return ids.index(reply.header.member_id)


async def _eventually(step, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            return await step()
        except Exception as exc:  # the channel is moving to another member
            last = exc
            await asyncio.sleep(0.1)
    raise AssertionError(f"{what} did not succeed within {timeout:.0f}s: {last}")


@pytest.mark.processes
async def test_state_fails_over_when_the_member_in_use_dies(tmp_path):
    cluster = start_etcd_cluster(tmp_path / "cluster", 3)
    # A name that must be resolved, and the members in an order where the first is killed.
    endpoints = [f"localhost:{m.client_port}" for m in cluster.members]
    state = EtcdState(endpoints, "/cluster/")
    keeper_state = EtcdState(endpoints, "/cluster/")
    try:
        await state.connect()
        await keeper_state.connect()
        key = state.key("nodes", "kept")

        async def register(lease_id: int) -> None:
            await keeper_state.put(key, resources_pb2.Node(name="kept"), lease=lease_id)

        keeper = LeaseKeeper(keeper_state, ttl=3, register=register)
        await keeper.start()
        cache = PrefixCache(state, state.key("items", ""), resources_pb2.Node)
        await cache.start()
        await state.put(state.key("items", "a"), resources_pb2.Node(name="a"))
        in_use = await _member_in_use(state, cluster)
        assert in_use == await _member_in_use(keeper_state, cluster)

        cluster.members[in_use].kill()
        killed = time.monotonic()
        # Reads and writes go on through another member (a brief error while the channel moves is allowed).
        await _eventually(lambda: state.put(state.key("items", "b"), resources_pb2.Node(name="b")), 10, "a write")
        assert await _eventually(lambda: state.get(state.key("items", "a"), resources_pb2.Node), 10, "a read")
        assert await _eventually(lambda: _member_in_use(state, cluster), 10, "a read") != in_use
        assert time.monotonic() - killed < 10
        # The watch followed: the cache sees the write made after the kill.
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and sorted(n.name for n in cache.values()) != ["a", "b"]:
            await asyncio.sleep(0.1)
        assert sorted(n.name for n in cache.values()) == ["a", "b"]
        # The lease keeper kept its lease alive through the failover: the key outlives several TTLs untouched.
        lease_before = keeper.lease_id
        await asyncio.sleep(7)
        assert keeper.lease_id == lease_before
        held = await _eventually(lambda: state.get_raw(key), 10, "a read")
        assert held is not None and held.lease == lease_before
        await cache.stop()
        await keeper.stop()
    finally:
        await state.close()
        await keeper_state.close()
        cluster.stop()
