"""The reconciler's per-replica memory: one ReplicaTrack per replica, dropped by forget (and only by it)."""

from __future__ import annotations

import asyncio
import time

import pytest

from clowder_controller.reconciler import ReplicaTrack, ReplicaTracker, backoff_delay

KEY = ("d", "abcd1234-0")


@pytest.mark.unit
def test_failures_back_off_and_gate_until_the_delay_passed():
    track = ReplicaTrack()
    assert track.gate_open() and not track.busy
    assert track.failed() == backoff_delay(1) == 1.0
    assert not track.gate_open() and track.not_before > time.monotonic()
    assert track.failed() == backoff_delay(2) == 2.0 and track.failures == 2
    # A replica that serves again counts from zero (the gate it set stays until it passes).
    track.failures = 0
    assert track.failed() == 1.0


@pytest.mark.unit
def test_forget_drops_everything_known_but_a_running_action():
    async def scenario() -> None:
        tracker = ReplicaTracker()
        track = tracker.track(KEY)
        track.failed()
        track.failed()
        track.written, track.last_bytes = (5, 6), b"replica"
        track.assumed, track.no_endpoint_since = ("n1", 1.0), 3.0
        running = asyncio.get_running_loop().create_future()
        track.action = asyncio.ensure_future(running)
        assert tracker.busy(KEY) and not tracker.gate_open(KEY)

        tracker.forget(KEY)
        kept = tracker.peek(KEY)
        # Still busy (its action runs on), nothing else remembered.
        assert kept is not None and kept.action is track.action
        assert kept == ReplicaTrack(action=track.action)

        running.set_result(None)
        await track.action
        kept.action = None
        tracker.forget(KEY)
        assert tracker.peek(KEY) is None and not tracker.busy(KEY) and tracker.gate_open(KEY)

    asyncio.run(scenario())


@pytest.mark.unit
def test_forget_gone_keeps_live_and_busy_replicas():
    async def scenario() -> None:
        tracker = ReplicaTracker()
        live, gone, working = ("d", "live-0"), ("d", "gone-0"), ("d", "new-1")
        for key in (live, gone, working):
            tracker.track(key).failed()
        pending = asyncio.get_running_loop().create_future()
        tracker.track(working).action = asyncio.ensure_future(pending)
        # A replica being created is not in etcd's cache yet, but its action keeps it.
        tracker.forget_gone({live})
        assert tracker.peek(live) is not None and tracker.peek(working) is not None
        assert tracker.peek(gone) is None
        assert tracker.actions() == [tracker.track(working).action]
        pending.cancel()
        tracker.forget_all()
        assert tracker.peek(live) is None and tracker.busy(working)

    asyncio.run(scenario())
