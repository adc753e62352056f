"""Controller simulation: 1,000 nodes and 10,000 deployments in a real etcd, a launcher that starts nothing.

Measures the scheduler's decision time while the reconciler places every
replica on 1,000 nodes, then revokes the leases of 500 nodes and measures how
long the cluster takes to converge (every replica on a live node, its runtime
"started"). The last line is JSON with decision_p99_ms and converge_s.

Run: .venv/bin/python bench/bench_controller.py [--nodes 1000] [--deployments 10000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import pathlib
import statistics
import sys
import tempfile
import time

from clowder.controller.v1 import resources_pb2
from clowder.storage.v1 import storage_pb2
from clowder_common import keys
from clowder_common.etcd import EtcdState, PrefixCache
from clowder_common.etcd_server import start_etcd
from clowder_controller.caches import stop_caches
from clowder_controller.config import ControllerConfig
from clowder_controller.events import EventRecorder
from clowder_controller.launcher import RuntimeSpec, RuntimeState, RuntimeStatus
from clowder_controller.reconciler import Reconciler, replica_id, template_hash

GIB = 1 << 30
# etcd's default --max-txn-ops.
TXN_OPS = 128
DIGEST = "sha256:" + "ab" * 32


class NullLauncher:
    """Starts nothing: every runtime 'runs' at once (the simulation measures the control plane only)."""

    async def start(self, spec: RuntimeSpec) -> int:
        return 1

    def status(self, replica: resources_pb2.Replica) -> RuntimeStatus:
        return RuntimeStatus(RuntimeState.RUNNING)

    async def stop(self, replica: resources_pb2.Replica, grace: float) -> None:
        return None

    async def stop_all(self, grace: float) -> None:
        return None


class InstantStorage:
    """Every node already holds the model: a pull answers with the blob at once."""

    async def pull(self, address: str, source_url: str, expected_digest: str = ""):
        yield storage_pb2.PullBlobResponse(blob=storage_pb2.Blob(digest=DIGEST, size_bytes=GIB))

    async def pull_image(self, address: str, image: resources_pb2.Image):
        yield storage_pb2.PullBlobResponse(blob=storage_pb2.Blob(digest=DIGEST, size_bytes=GIB))

    async def pin(self, address: str, holder: str, image: str) -> None:
        pass

    async def unpin(self, address: str, holder: str) -> None:
        pass

    async def close(self) -> None:
        return None


async def put_batched(state: EtcdState, items: list[tuple[str, bytes, int | None]]) -> None:
    batches = [items[i:i + TXN_OPS] for i in range(0, len(items), TXN_OPS)]
    for i in range(0, len(batches), 16):
        await asyncio.gather(*(state.put_many(b) for b in batches[i:i + 16]))


async def populate(state: EtcdState, nodes: int, deployments: int) -> tuple[int, int]:
    """Nodes on two leases (the half to lose on its own), one image, deployments with a pending replica each."""
    keep_lease, lose_lease = await state.grant_lease(3600), await state.grant_lease(3600)
    items = []
    for i in range(nodes):
        node = resources_pb2.Node(name=f"node-{i:04d}", storage_address=f"10.0.{i // 250}.{i % 250}:3093",
                                  labels={"zone": f"z{i % 4}"}, memory_bytes=64 * GIB, cpus=16)
        items.append((state.key(keys.node(node.name)), node.SerializeToString(),
                      lose_lease if i % 2 else keep_lease))
    image = resources_pb2.Image(alias="m", source_url="file:///models/m.gguf", digest=DIGEST, size_bytes=GIB)
    items.append((state.key(keys.image("m")), image.SerializeToString(), None))
    for i in range(deployments):
        # One deployment in ten is pinned to a zone: the label filter does real work.
        selector = {"zone": f"z{i % 4}"} if i % 10 == 0 else {}
        d = resources_pb2.Deployment(name=f"dep-{i:05d}", image="m", replicas=1, node_selector=selector)
        items.append((state.key(keys.deployment(d.name)), d.SerializeToString(), None))
        template = template_hash(d)
        r = resources_pb2.Replica(id=replica_id(template, 0), deployment=d.name, slot=0, template_hash=template,
                                  state=resources_pb2.REPLICA_STATE_PENDING, message="waiting for placement")
        items.append((state.key(keys.replica(d.name, r.id)), r.SerializeToString(), None))
    await put_batched(state, items)
    return keep_lease, lose_lease


async def wait_converged(replicas: PrefixCache, nodes: PrefixCache, live_nodes: int, expected: int,
                         timeout: float, progress_every: int = 10) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        live = {n.name for n in nodes.values()}
        if len(live) != live_nodes:
            await asyncio.sleep(0.05)
            continue
        done = sum(1 for r in replicas.values()
                   if r.node in live and r.state == resources_pb2.REPLICA_STATE_STARTING)
        if done == expected:
            return time.monotonic() - started
        if progress_every and int(time.monotonic() - started) % progress_every == 0:
            states: dict[str, int] = {}
            for r in replicas.values():
                name = resources_pb2.ReplicaState.Name(r.state)
                states[name] = states.get(name, 0) + 1
            print(f"  {time.monotonic() - started:5.1f}s {done}/{expected} {states}", flush=True)
        await asyncio.sleep(0.25)
    raise TimeoutError(f"not converged after {timeout:.0f}s")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def run(args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory(prefix="bench-controller-") as tmp:
        etcd = start_etcd(pathlib.Path(tmp) / "etcd")
        state = EtcdState([etcd.endpoint], "/bench/")
        await state.connect()
        try:
            t0 = time.monotonic()
            _, lose_lease = await populate(state, args.nodes, args.deployments)
            write_s = time.monotonic() - t0
            print(f"wrote {args.nodes} nodes, {args.deployments} deployments and their replicas in {write_s:.1f}s",
                  flush=True)
            # No grace for lost nodes: the benchmark times the control plane's work of moving replicas, not the
            # policy wait before it (node_lost_grace_s, 30 s by default, would only add itself to converge_s).
            config = ControllerConfig(etcd_endpoints=(etcd.endpoint,), etcd_prefix="/bench/", resync_interval_s=2.0,
                                      runtime_start_timeout_s=3600, data_dir=tmp, node_lost_grace_s=0)
            reconciler = Reconciler(state, InstantStorage(), NullLauncher(), config, EventRecorder(state))
            watch_replicas = PrefixCache(state, state.key(keys.REPLICAS), resources_pb2.Replica)
            watch_nodes = PrefixCache(state, state.key(keys.NODES), resources_pb2.Node)
            await watch_replicas.start(30)
            await watch_nodes.start(30)
            t0 = time.monotonic()
            await reconciler.start()
            await wait_converged(watch_replicas, watch_nodes, args.nodes, args.deployments, args.timeout)
            initial_s = time.monotonic() - t0
            decisions = list(reconciler.decision_seconds)
            print(f"placed {args.deployments} replicas on {args.nodes} nodes in {initial_s:.1f}s "
                  f"({len(decisions)} decisions)", flush=True)
            await asyncio.sleep(1.0)  # let the event writes of the first placement drain
            reconciler.decision_seconds.clear()

            lost_at = time.monotonic()
            await state.revoke_lease(lose_lease)
            await wait_converged(watch_replicas, watch_nodes, args.nodes - args.nodes // 2, args.deployments,
                                 args.timeout)
            converge_s = time.monotonic() - lost_at
            after = list(reconciler.decision_seconds)
            per_node: dict[str, int] = {}
            for r in watch_replicas.values():
                per_node[r.node] = per_node.get(r.node, 0) + 1
            print(f"lost {args.nodes // 2} nodes: {len(after)} replicas rescheduled, converged in {converge_s:.1f}s; "
                  f"replicas per live node {min(per_node.values())}..{max(per_node.values())}", flush=True)
            await reconciler.stop()
            await stop_caches([watch_replicas, watch_nodes])
        finally:
            await state.close()
            etcd.stop()
    ms = [d * 1000 for d in decisions]
    ms_after = [d * 1000 for d in after]
    return {
        "nodes": args.nodes,
        "deployments": args.deployments,
        "decisions": len(ms),
        "decision_median_ms": round(statistics.median(ms), 3),
        "decision_p99_ms": round(percentile(ms, 0.99), 3),
        "decision_p99_ms_after_loss": round(percentile(ms_after, 0.99), 3) if ms_after else None,
        "initial_placement_s": round(initial_s, 2),
        "converge_s": round(converge_s, 2),
        "write_s": round(write_s, 2),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=1000)
    parser.add_argument("--deployments", type=int, default=10000)
    parser.add_argument("--timeout", type=float, default=180.0, help="per convergence phase")
    parser.add_argument("--log-level", default="ERROR")
    args = parser.parse_args(argv)
    logging.basicConfig(level=getattr(logging, args.log_level))
    result = asyncio.run(run(args))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
