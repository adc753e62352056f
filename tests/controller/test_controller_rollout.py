"""Replica slots: scaling and rolling updates (surge 1) planned from what exists, the same way every time."""

from __future__ import annotations

import pytest

from clowder.controller.v1 import resources_pb2
from clowder_controller.reconciler import plan_rollout, replica_id

pytestmark = pytest.mark.unit

READY = resources_pb2.REPLICA_STATE_READY
STARTING = resources_pb2.REPLICA_STATE_STARTING


def rep(template, slot, state=READY):
    return resources_pb2.Replica(id=replica_id(template, slot), deployment="d", slot=slot, template_hash=template,
                                 state=state)


def names(replicas):
    return sorted(r.id for r in replicas)


@pytest.mark.parametrize("wanted, existing, create, remove", [
    # scale from nothing, up, down, and no-op
    (3, [], [0, 1, 2], []),
    (3, [rep("new", 0)], [1, 2], []),
    (1, [rep("new", 0), rep("new", 1), rep("new", 2)], [], ["new-1", "new-2"]),
    (2, [rep("new", 0), rep("new", 1)], [], []),
    # a gap (a replica removed by hand) is refilled at its slot
    (3, [rep("new", 0), rep("new", 2)], [1], []),
    # rolling update: one new replica above the count, no old one stops before a new one is ready
    (2, [rep("old", 0), rep("old", 1)], [0], []),
    (2, [rep("old", 0), rep("old", 1), rep("new", 0, STARTING)], [], []),
    (2, [rep("old", 0), rep("old", 1), rep("new", 0)], [], ["old-0"]),
    (2, [rep("old", 1), rep("new", 0)], [1], []),
    (2, [rep("old", 1), rep("new", 0), rep("new", 1)], [], ["old-1"]),
    # unready old replicas serve nobody: they go at once
    (2, [rep("old", 0, STARTING), rep("old", 1), rep("new", 0, STARTING)], [], ["old-0"]),
    # scaled to zero during an update: everything goes
    (0, [rep("old", 0), rep("new", 0)], [], ["new-0", "old-0"]),
])
def test_plan_rollout(wanted, existing, create, remove):
    got_create, got_remove = plan_rollout(wanted, "new", existing)
    assert got_create == create
    assert names(got_remove) == sorted(remove)


def test_replicas_without_slot_fields_count_as_old():
    legacy = resources_pb2.Replica(id="3fa9c2d1", deployment="d", state=READY)
    create, remove = plan_rollout(1, "new", [legacy])
    assert create == [0] and remove == []
    create, remove = plan_rollout(1, "new", [legacy, rep("new", 0)])
    assert create == [] and names(remove) == ["3fa9c2d1"]
