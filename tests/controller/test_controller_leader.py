"""Several controllers: one leader reconciles; a killed leader is replaced, no replica is duplicated or lost, and a
deposed leader cannot write (its writes are fenced by its term)."""

from __future__ import annotations

import asyncio
import pathlib
import signal
import time

import pytest

from clowder.controller.v1 import resources_pb2
from clowder_common import keys
from clowder_common.errors import Unavailable
from clowder_common.etcd import EtcdState
from clowder_common.etcd_server import start_etcd_cluster
from clowder_common.processes import async_wait_for_port, terminate
from clowder_controller.app import create_controller
from clowder_controller.events import EventRecorder
from clowder_controller.launcher import LocalProcessLauncher
from clowder_controller.leader import LEADER, current_leader
from clowder_controller.reconciler import Reconciler, replica_id, template_hash
from clowder_controller.storage_client import StorageClients

from controller_helpers import start_controller_process
from helpers.configs import controller_config
from helpers.wait import wait_for

pytestmark = pytest.mark.processes

TOKEN = "leader-test-token"
TTL = 2


def start_controller(etcd, prefix, tmp_path: pathlib.Path, name: str):
    return start_controller_process(etcd.endpoint, prefix, tmp_path, name, TOKEN,
                                    {"CLOWDER_LEADER_TTL_S": str(TTL), "CLOWDER_RESYNC_INTERVAL_S": "0.5"})


async def replica_ids(state, deployment):
    items, _ = await state.list(state.key(keys.replicas_of(deployment)), resources_pb2.Replica)
    return sorted(i.value.id for i in items)


async def test_killed_leader_is_replaced_without_duplicate_replicas(etcd, etcd_prefix, state, tmp_path):
    await state.put(state.key(keys.image("m")), resources_pb2.Image(alias="m", source_url="file:///nowhere.gguf"))
    deployment = resources_pb2.Deployment(name="d", image="m", replicas=3)
    await state.put(state.key(keys.deployment("d")), deployment)
    expected = [replica_id(template_hash(deployment), s) for s in range(3)]

    first, first_port = start_controller(etcd, etcd_prefix, tmp_path, "c1")
    second, second_port = start_controller(etcd, etcd_prefix, tmp_path, "c2")
    try:
        await async_wait_for_port("127.0.0.1", first_port, 60)
        await async_wait_for_port("127.0.0.1", second_port, 60)
        leader = await wait_for(lambda: current_leader(state), 30, "a leader")
        by_port = {f"127.0.0.1:{first_port}": (first, second, second_port),
                   f"127.0.0.1:{second_port}": (second, first, first_port)}
        leading, standby, standby_port = by_port[leader.address]

        # No node is registered: the replicas wait, each with its reason, and exactly three exist.
        async def three_pending():
            items, _ = await state.list(state.key(keys.replicas_of("d")), resources_pb2.Replica)
            return len(items) == 3 and all("storage node" in i.value.message for i in items)

        await wait_for(three_pending, 30, "three pending replicas")
        assert await replica_ids(state, "d") == expected

        leading.send_signal(signal.SIGKILL)
        leading.wait(10)
        killed_at = time.monotonic()

        async def standby_leads():
            current = await current_leader(state)
            return current is not None and current.address == f"127.0.0.1:{standby_port}"

        await wait_for(standby_leads, TTL + 10, "the standby to take over")
        assert time.monotonic() - killed_at < TTL + 5

        # The new leader reconciles: scaling to 5 adds exactly slots 3 and 4.
        deployment.replicas = 5
        await state.put(state.key(keys.deployment("d")), deployment)
        five = [replica_id(template_hash(deployment), s) for s in range(5)]

        async def five_exist():
            return await replica_ids(state, "d") == five

        await wait_for(five_exist, 20, "five replicas")
        await asyncio.sleep(1.5)  # a few more passes of the new leader
        assert await replica_ids(state, "d") == five
        assert standby.poll() is None
    finally:
        for proc in (first, second):
            if proc.poll() is None:
                terminate(proc, 10)


async def test_two_reconcilers_at_once_never_duplicate(etcd, state, tmp_path):
    """Safe to run twice: two reconcilers on the same state (a split brain) still make exactly N replicas."""
    config = controller_config(etcd.endpoint, state.prefix, tmp_path, resync_interval_s=0.2)
    await state.put(state.key(keys.image("m")), resources_pb2.Image(alias="m", source_url="file:///nowhere.gguf"))
    reconcilers = []
    for i in range(2):
        launcher = LocalProcessLauncher((etcd.endpoint,), state.prefix, "127.0.0.1:0", tmp_path / f"l{i}", TOKEN)
        reconcilers.append(Reconciler(state, StorageClients(TOKEN), launcher, config, EventRecorder(state)))
    for reconciler in reconcilers:
        await reconciler.start()
    try:
        for count in (4, 7, 2):
            deployment = resources_pb2.Deployment(name="d", image="m", replicas=count)
            await state.put(state.key(keys.deployment("d")), deployment)
            wanted = [replica_id(template_hash(deployment), s) for s in range(count)]

            async def exact(wanted=wanted):
                await asyncio.gather(*(r.reconcile_once() for r in reconcilers))
                return await replica_ids(state, "d") == sorted(wanted)

            await wait_for(exact, 20, f"{count} replicas")
            await asyncio.sleep(0.6)
            assert await replica_ids(state, "d") == sorted(wanted)
    finally:
        for reconciler in reconcilers:
            await reconciler.stop()


async def test_leader_killed_during_a_scale_up_is_replaced_and_the_count_is_exact(etcd, etcd_prefix, state, tmp_path):
    await state.put(state.key(keys.image("m")), resources_pb2.Image(alias="m", source_url="file:///nowhere.gguf"))
    deployment = resources_pb2.Deployment(name="d", image="m", replicas=0)
    await state.put(state.key(keys.deployment("d")), deployment)
    procs = {}
    for name in ("c1", "c2"):
        proc, port = start_controller(etcd, etcd_prefix, tmp_path, name)
        procs[f"127.0.0.1:{port}"] = proc
    try:
        for address in procs:
            await async_wait_for_port("127.0.0.1", int(address.rsplit(":", 1)[1]), 60)
        leader = await wait_for(lambda: current_leader(state), 30, "a leader")
        leading = procs[leader.address]
        standby_address = next(a for a in procs if a != leader.address)

        # Scale 0 -> 40 and kill the leader as soon as the first replica exists, while it creates the rest.
        _, revision = await state.list(state.key(keys.replicas_of("d")), resources_pb2.Replica)
        deployment.replicas = 40
        await state.put(state.key(keys.deployment("d")), deployment)
        async for _ in state.watch(state.key(keys.replicas_of("d")), resources_pb2.Replica, revision + 1):
            leading.send_signal(signal.SIGKILL)
            break
        killed_at = time.monotonic()
        leading.wait(10)
        at_kill = len(await replica_ids(state, "d"))

        async def standby_leads():
            current = await current_leader(state)
            return current is not None and current.address == standby_address

        await wait_for(standby_leads, TTL + 10, "the standby to take over")
        assert time.monotonic() - killed_at < TTL + 5
        wanted = [replica_id(template_hash(deployment), s) for s in range(40)]

        async def exact():
            return await replica_ids(state, "d") == sorted(wanted)

        await wait_for(exact, 20, "exactly 40 replicas")
        await asyncio.sleep(1.5)  # a few more passes of the new leader: nothing added, nothing removed
        assert await replica_ids(state, "d") == sorted(wanted), f"{at_kill} existed when the leader was killed"
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                terminate(proc, 10)


@pytest.mark.parametrize("how", ["key deleted", "lease revoked"])
async def test_a_deposed_leader_cannot_write(etcd, etcd_prefix, state, tmp_path, how):
    """The leader loses its key but has not noticed yet (a long TTL checks it seldom): its writes fail."""
    config = controller_config(etcd.endpoint, etcd_prefix, tmp_path, resync_interval_s=0.2, leader_ttl_s=40)
    app = await create_controller(config, TOKEN)
    await state.put(state.key(keys.image("m")), resources_pb2.Image(alias="m", source_url="file:///nowhere.gguf"))
    deployment = resources_pb2.Deployment(name="d", image="m", replicas=1)
    await state.put(state.key(keys.deployment("d")), deployment)
    await app.start()
    try:
        await wait_for(lambda: _async(app.is_leader), 20, "leadership")
        await wait_for(lambda: _count_is(state, 1), 20, "one replica")
        term = app.elector.fence
        first, _ = await state.list(state.key(keys.replicas_of("d")), resources_pb2.Replica)
        leader_key = state.key(LEADER)
        held = await state.get_raw(leader_key)
        assert held.create_revision == term.create_revision
        if how == "key deleted":
            await state.delete(leader_key)
        else:
            await state.revoke_lease(held.lease)
        deployment.replicas = 4
        await state.put(state.key(keys.deployment("d")), deployment)

        # The controller notices within a quarter of the TTL, steps down and is elected again (nobody else
        # campaigns); only then, under the new term, are the three replicas created.
        await wait_for(lambda: _async(app.is_leader and app.elector.fence != term), 30, "a new term")
        new_term = app.elector.fence
        await wait_for(lambda: _count_is(state, 4), 30, "four replicas")
        items, _ = await state.list(state.key(keys.replicas_of("d")), resources_pb2.Replica)
        added = [i for i in items if i.key not in {f.key for f in first}]
        assert len(added) == 3
        early = [i.key for i in added if i.create_revision < new_term.create_revision]
        assert not early, f"the deposed term wrote {early}"
    finally:
        await app.stop()


async def _count_is(state, count: int) -> bool:
    try:
        items, _ = await state.list(state.key(keys.replicas_of("d")), resources_pb2.Replica)
    except Unavailable:  # an etcd member died and the others are electing a leader: look again
        return False
    return len(items) == count


async def _async(value):
    return value


async def test_controllers_carry_on_when_the_etcd_member_they_use_dies(tmp_path):
    """Three etcd members, two controllers given all three: the first member (the one in use) is killed."""
    cluster = start_etcd_cluster(tmp_path / "etcd", 3)
    endpoints = ",".join(cluster.endpoints)
    state = EtcdState(list(reversed(cluster.endpoints)), "/members/")  # this test's client uses another member
    procs = []
    try:
        await state.connect()
        await state.put(state.key(keys.image("m")), resources_pb2.Image(alias="m", source_url="file:///x.gguf"))
        deployment = resources_pb2.Deployment(name="d", image="m", replicas=3)
        await state.put(state.key(keys.deployment("d")), deployment)
        for name in ("c1", "c2"):
            procs.append(start_controller_process(endpoints, "/members/", tmp_path, name, TOKEN,
                                                  {"CLOWDER_LEADER_TTL_S": str(TTL),
                                                   "CLOWDER_RESYNC_INTERVAL_S": "0.5"})[0])
        await wait_for(lambda: _count_is(state, 3), 60, "three replicas")
        cluster.members[0].kill()

        # When the killed member led the raft group, etcd answers "leader changed" until the other two elect one.
        deployment.replicas = 5

        async def scaled():
            try:
                await state.put(state.key(keys.deployment("d")), deployment)
            except Unavailable:
                return False
            return True

        await wait_for(scaled, 20, "the scale-up to be written")
        await wait_for(lambda: _count_is(state, 5), 30, "five replicas after the member died")
        assert await current_leader(state) is not None
        assert all(p.poll() is None for p in procs)
    finally:
        for proc in procs:
            terminate(proc, 10)
        await state.close()
        cluster.stop()
