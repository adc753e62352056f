"""The etcd state layer against a real etcd: CAS, leases, prefix caches that survive restarts."""

from __future__ import annotations

import asyncio

import pytest

from clowder.controller.v1 import resources_pb2
from clowder_common.errors import AlreadyExists
from clowder_common.etcd import EtcdState, LeaseKeeper, PrefixCache


async def test_create_refuses_existing_key(state):
    key = state.key("images", "smol")
    await state.create(key, resources_pb2.Image(alias="smol"))
    with pytest.raises(AlreadyExists):
        await state.create(key, resources_pb2.Image(alias="other"))
    got = await state.get(key, resources_pb2.Image)
    assert got is not None and got.value.alias == "smol"


async def test_update_compares_mod_revision(state):
    key = state.key("deployments", "d")
    await state.create(key, resources_pb2.Deployment(name="d", replicas=1))
    first = await state.get(key, resources_pb2.Deployment)
    assert await state.update(key, resources_pb2.Deployment(name="d", replicas=2), first.mod_revision)
    # A writer holding the old revision loses.
    assert not await state.update(key, resources_pb2.Deployment(name="d", replicas=5), first.mod_revision)
    now = await state.get(key, resources_pb2.Deployment)
    assert now.value.replicas == 2


async def test_delete_only_if_unchanged(state):
    key = state.key("deployments", "x")
    await state.create(key, resources_pb2.Deployment(name="x"))
    seen = await state.get(key, resources_pb2.Deployment)
    await state.put(key, resources_pb2.Deployment(name="x", replicas=3))
    assert not await state.delete(key, seen.mod_revision)
    assert await state.get(key, resources_pb2.Deployment) is not None
    assert await state.delete(key)
    assert await state.get(key, resources_pb2.Deployment) is None


async def test_list_is_sorted_and_scoped(state):
    for name in ("b", "a", "c"):
        await state.put(state.key("nodes", name), resources_pb2.Node(name=name))
    await state.put(state.key("nodesx", "z"), resources_pb2.Node(name="z"))
    items, revision = await state.list(state.key("nodes", ""), resources_pb2.Node)
    assert [i.value.name for i in items] == ["a", "b", "c"]
    assert revision >= max(i.mod_revision for i in items)


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


async def test_prefix_cache_rebuilds_after_etcd_restart(tmp_path):
    from clowder_common.etcd_server import start_etcd

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
