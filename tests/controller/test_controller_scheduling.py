"""Scheduler plugins, each with its own table, plus the scheduler that combines them."""

from __future__ import annotations

import dataclasses

import pytest

from clowder.controller.v1 import resources_pb2
from clowder_controller.scheduling.framework import NodeInfo, PlacementRequest
from clowder_controller.scheduling.gpus import GpuFit
from clowder_controller.scheduling.labels import LabelMatch
from clowder_controller.scheduling.locality import Locality
from clowder_common.runtime_settings import DEFAULT_SLOTS, RuntimeSettings
from clowder_controller.scheduling.memory import MemoryFit, estimate_memory, kv_cache_bytes, read_model_shape
from clowder_controller.scheduling.preemption import Placed, pick_victims
from clowder_controller.scheduling.profiles import build_profile, build_scheduler
from clowder_controller.scheduling.framework import Scorer
from clowder_controller.scheduling.registry import builtin_plugins
from clowder_common.errors import InvalidArgument
from clowder_common.plugins import Plugin
from clowder_controller.scheduling.spread import BinPack, Spread

GIB = 1 << 30


def node(name, labels=None, memory=8 * GIB, gpus=0, allocated=0, replicas=0, digests=(), per_deployment=None):
    info = NodeInfo(resources_pb2.Node(name=name, labels=labels or {}, memory_bytes=memory, gpus=gpus),
                    allocated_memory=allocated, replicas=replicas, digests=set(digests),
                    per_deployment=dict(per_deployment or {}))
    return info


@pytest.mark.unit
@pytest.mark.parametrize("selector, labels, fits", [
    ({}, {}, True),
    ({}, {"zone": "a"}, True),
    ({"zone": "a"}, {"zone": "a"}, True),
    ({"zone": "a"}, {"zone": "a", "gpu": "h100"}, True),
    ({"zone": "a"}, {"zone": "b"}, False),
    ({"zone": "a"}, {}, False),
    ({"zone": "a", "gpu": "h100"}, {"zone": "a"}, False),
])
def test_label_match(selector, labels, fits):
    request = PlacementRequest("d", node_selector=selector)
    kept = LabelMatch().filter(request, [node("n", labels)])
    assert bool(kept) is fits
    if not fits:
        assert "zone=a" in LabelMatch().reason(request, 1)


@pytest.mark.unit
@pytest.mark.parametrize("need, total, allocated, fits", [
    (0, 8 * GIB, 8 * GIB, True),          # unknown need: anything fits
    (GIB, 8 * GIB, 0, True),
    (GIB, 8 * GIB, 7 * GIB, True),        # exactly the rest
    (GIB, 8 * GIB, 7 * GIB + 1, False),
    (9 * GIB, 8 * GIB, 0, False),
    (9 * GIB, 0, 0, True),                # the node did not report memory
])
def test_memory_fit(need, total, allocated, fits):
    request = PlacementRequest("d", memory_bytes=need)
    assert bool(MemoryFit().filter(request, [node("n", memory=total, allocated=allocated)])) is fits


@pytest.mark.unit
@pytest.mark.parametrize("need, has, allocated, fits", [
    (0, 0, 0, True), (1, 0, 0, False), (1, 1, 0, True), (2, 4, 2, True), (2, 4, 3, False),
])
def test_gpu_fit(need, has, allocated, fits):
    info = node("n", gpus=has)
    info.allocated_gpus = allocated
    assert bool(GpuFit().filter(PlacementRequest("d", gpus=need), [info])) is fits


@pytest.mark.unit
def test_spread_prefers_empty_nodes_and_nodes_without_the_deployment():
    request = PlacementRequest("d", memory_bytes=GIB)
    empty, half, has_d = node("a"), node("b", allocated=4 * GIB), node("c", per_deployment={"d": 1})
    scores = Spread().score(request, [empty, half, has_d])
    assert scores["a"] > scores["b"] and scores["a"] > scores["c"]
    assert all(0.0 <= s <= 1.0 for s in scores.values())


@pytest.mark.unit
def test_binpack_prefers_the_fullest_node():
    request = PlacementRequest("d", memory_bytes=GIB)
    scores = BinPack().score(request, [node("a"), node("b", allocated=6 * GIB), node("c", allocated=2 * GIB)])
    assert scores["b"] > scores["c"] > scores["a"]
    assert all(0.0 <= s <= 1.0 for s in scores.values())


@pytest.mark.unit
@pytest.mark.parametrize("digest, held, score", [
    ("sha256:aa", {"sha256:aa"}, 1.0), ("sha256:aa", {"sha256:bb"}, 0.0), ("", {"sha256:aa"}, 0.0),
])
def test_locality(digest, held, score):
    assert Locality().score(PlacementRequest("d", digest=digest), [node("n", digests=held)]) == {"n": score}


@pytest.mark.unit
@pytest.mark.parametrize("placement, expected", [("spread", "empty"), ("binpack", "busy")])
def test_profiles_pick_by_fullness(placement, expected):
    nodes = [node("busy", allocated=5 * GIB, replicas=3), node("empty")]
    decision = build_scheduler(placement).schedule(PlacementRequest("d", memory_bytes=GIB),
                                                   sorted(nodes, key=lambda n: n.name))
    assert decision.node.name == expected and decision.reason == ""


@pytest.mark.unit
def test_locality_breaks_an_otherwise_even_choice():
    nodes = [node("a"), node("b", digests={"sha256:m"})]
    decision = build_scheduler("spread").schedule(PlacementRequest("d", digest="sha256:m"), nodes)
    assert decision.node.name == "b"


@pytest.mark.unit
def test_equal_scores_go_to_the_first_name():
    decision = build_scheduler("spread").schedule(PlacementRequest("d"), [node("a"), node("b"), node("c")])
    assert decision.node.name == "a"


@pytest.mark.unit
def test_unplaceable_request_explains_every_filter():
    nodes = [node("small", labels={"zone": "a"}, memory=GIB), node("other", labels={"zone": "b"})]
    request = PlacementRequest("d", memory_bytes=4 * GIB, node_selector={"zone": "a"})
    decision = build_scheduler("spread").schedule(request, nodes)
    assert decision.node is None
    assert decision.reason == ("0/2 nodes fit: 1 without labels zone=a; 1 without 4.00 GiB of free memory")


@pytest.mark.unit
def test_no_nodes_at_all():
    decision = build_scheduler().schedule(PlacementRequest("d"), [])
    assert decision.node is None and "no node" in decision.reason


@pytest.mark.unit
def test_unknown_placement_is_refused():
    with pytest.raises(ValueError):
        build_scheduler("random")
    with pytest.raises(ValueError, match="'weight' must be a number >= 0"):
        build_scheduler("spread", locality_weight=-1)


@pytest.mark.unit
def test_placement_profiles_are_plugin_instances_from_the_registry():
    scheduler = build_scheduler("binpack", locality_weight=0.5)
    assert [(f.name, type(f.plugin)) for f in scheduler.filters] == [("labels", LabelMatch), ("gpus", GpuFit),
                                                                     ("memory", MemoryFit)]
    assert [(s.type, s.weight) for s in scheduler.scorers] == [("binpack", 1.0), ("locality", 0.5)]
    # A zero weight turns the scorer off, as in routing profiles.
    assert [s.type for s in build_scheduler("spread", locality_weight=0).scorers] == ["spread"]


@pytest.mark.unit
def test_a_placement_plugin_registered_by_type_runs_under_its_own_name():
    class Cheapest(Plugin, Scorer):
        @dataclasses.dataclass(frozen=True)
        class Params:
            prefer: str = ""

        def __init__(self, prefer: str) -> None:
            self.prefer = prefer

        def score(self, request, nodes):
            return {n.name: 1.0 if n.name == self.prefer else 0.0 for n in nodes}

    plugins = builtin_plugins()
    plugins.register("scorer", "named", Cheapest.create)  # under a type name of the caller's choice
    spec = {"filters": ["labels"], "scorers": [{"type": "named", "name": "likes-c", "weight": 5, "prefer": "c"},
                                              {"type": "spread", "weight": 1}]}
    decision = build_profile("custom", spec, plugins).schedule(PlacementRequest("d"), [node("a"), node("b"), node("c")])
    assert decision.node.name == "c"
    with pytest.raises(InvalidArgument, match="'prefer' must be a string"):
        build_profile("custom", {"scorers": [{"type": "named", "prefer": 3}]}, plugins)
    with pytest.raises(InvalidArgument, match="unknown scorer 'named'"):
        build_profile("custom", spec)


@pytest.mark.unit
def test_assigning_fills_the_node_for_the_next_decision():
    scheduler = build_scheduler("spread")
    nodes = [node("a", memory=3 * GIB), node("b", memory=3 * GIB)]
    request = PlacementRequest("d", memory_bytes=GIB + GIB // 2)
    placed = []
    for _ in range(5):
        decision = scheduler.schedule(request, nodes)
        if decision.node is None:
            break
        decision.node.assign(request)
        placed.append(decision.node.name)
    assert sorted(placed) == ["a", "a", "b", "b"]


@pytest.mark.inprocess
def test_memory_estimate_from_gguf_metadata(model_path):
    shape = read_model_shape(model_path)
    # SmolLM2-135M: 30 layers, 576 wide, 9 heads of which 3 carry K/V.
    assert (shape.layers, shape.embedding_length, shape.heads, shape.kv_heads) == (30, 576, 9, 3)
    assert shape.file_bytes == model_path.stat().st_size
    head_dim = 576 // 9
    assert kv_cache_bytes(shape, 4096) == 2 * 30 * 4096 * 3 * head_dim * 2
    image = resources_pb2.Image(model_shape=shape, configuration=resources_pb2.ImageConfiguration(context_size=4096))
    small = resources_pb2.Image(model_shape=shape, configuration=resources_pb2.ImageConfiguration(context_size=512))
    deployment = resources_pb2.Deployment(name="d")
    big_need, small_need = estimate_memory(image, deployment), estimate_memory(small, deployment)
    # Every slot (the runtime's default count here) holds a context of KV cache.
    assert big_need - small_need == DEFAULT_SLOTS * (kv_cache_bytes(shape, 4096) - kv_cache_bytes(shape, 512))
    # The deployment's slots and context win over the aimage's and the cluster's.
    two_slots = resources_pb2.Deployment(name="d", slots=2, context_size=512)
    cluster = RuntimeSettings(slots=16, context_size=1024)
    assert estimate_memory(image, two_slots, cluster) - estimate_memory(image, deployment, RuntimeSettings(slots=1)) \
        == kv_cache_bytes(shape, 2 * 512) - kv_cache_bytes(shape, 4096)
    assert estimate_memory(small, deployment, cluster) - small_need == kv_cache_bytes(shape, 16 * 512) - kv_cache_bytes(
        shape, DEFAULT_SLOTS * 512)
    assert big_need > shape.file_bytes
    # The deployment's own figure wins.
    assert estimate_memory(image, resources_pb2.Deployment(name="d", memory_bytes=123)) == 123
    # Nothing known: nothing to check.
    assert estimate_memory(resources_pb2.Image(), deployment) == 0


def placed(name, deployment, priority, memory, gpus=0):
    return Placed(resources_pb2.Replica(id=name, deployment=deployment),
                  PlacementRequest(deployment, memory_bytes=memory, gpus=gpus), priority)


def full_node(name, items, labels=None, memory=8 * GIB, gpus=0):
    info = node(name, labels=labels, memory=memory, gpus=gpus)
    for p in items:
        info.assign(p.request)
    return info


@pytest.mark.unit
@pytest.mark.parametrize("priority, need, on_a, on_b, expected_node, expected_victims", [
    # one low replica is enough on a: evict just it
    (10, 4 * GIB, [placed("a1", "low", 0, 6 * GIB)], [placed("b1", "low", 0, 3 * GIB), placed("b2", "low", 0, 3 * GIB)],
     "a", ["a1"]),
    # equal priority is never evicted
    (0, 4 * GIB, [placed("a1", "low", 0, 6 * GIB)], [placed("b1", "low", 0, 6 * GIB)], None, []),
    # higher-priority replicas stay: only b has something lower
    (5, 4 * GIB, [placed("a1", "top", 9, 6 * GIB)], [placed("b1", "low", 1, 6 * GIB)], "b", ["b1"]),
    # the lowest priority goes first when either would do
    (10, 2 * GIB, [placed("a1", "mid", 5, 4 * GIB), placed("a2", "low", 1, 4 * GIB)], [], "a", ["a2"]),
    # ... and more of them when one is not enough
    (10, 6 * GIB, [placed("a1", "mid", 5, 4 * GIB), placed("a2", "low", 1, 3 * GIB)], [], "a", ["a2", "a1"]),
    # evicting everything lower still would not make room
    (10, 9 * GIB, [placed("a1", "low", 0, 8 * GIB)], [placed("b1", "low", 0, 8 * GIB)], None, []),
])
def test_pick_victims(priority, need, on_a, on_b, expected_node, expected_victims):
    nodes = [full_node("a", on_a), full_node("b", on_b)]
    found = pick_victims(PlacementRequest("high", memory_bytes=need), priority, nodes, {"a": on_a, "b": on_b})
    if expected_node is None:
        assert found is None
    else:
        assert found[0].name == expected_node
        assert [v.replica.id for v in found[1]] == expected_victims


@pytest.mark.unit
def test_preemption_respects_labels_and_gpus():
    on_a = [placed("a1", "low", 0, GIB, gpus=1)]
    nodes = [full_node("a", on_a, labels={"zone": "x"}, gpus=1), full_node("b", [], labels={"zone": "y"}, gpus=0)]
    wanted = PlacementRequest("high", gpus=1, node_selector={"zone": "x"})
    found = pick_victims(wanted, 10, nodes, {"a": on_a})
    assert found[0].name == "a" and [v.replica.id for v in found[1]] == ["a1"]
    assert pick_victims(PlacementRequest("high", gpus=1, node_selector={"zone": "y"}), 10, nodes, {"a": on_a}) is None
