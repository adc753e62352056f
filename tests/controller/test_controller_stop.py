"""Stopping the reconciler is bounded: the bench-controller hang (a stop that waited forever) stays fixed."""

from __future__ import annotations

import asyncio
import time

import pytest

from clowder_controller.events import EventRecorder
from clowder_controller.launcher import LocalProcessLauncher
from clowder_controller.reconciler import Reconciler
from clowder_controller.storage_client import StorageClients
from helpers.configs import controller_config

pytestmark = pytest.mark.processes

TOKEN = "stop-test-token"


async def test_reconciler_stops_when_woken_at_the_moment_it_is_cancelled(etcd, state, tmp_path):
    """A pass finishing (or an etcd event) wakes the loop as stop() cancels it. Python 3.11's asyncio.wait_for
    dropped that cancellation and the loop ran on while stop() waited for it: the hang seen in
    `make bench-controller`. Waking it by hand in the same loop turn as stop() reproduces the race every time."""
    config = controller_config(etcd.endpoint, state.prefix, tmp_path, resync_interval_s=5)
    for i in range(5):
        launcher = LocalProcessLauncher((etcd.endpoint,), state.prefix, "127.0.0.1:0", tmp_path / f"l{i}", TOKEN)
        reconciler = Reconciler(state, StorageClients(TOKEN), launcher, config, EventRecorder(state))
        await reconciler.start()
        await asyncio.sleep(0.3)  # the loop is waiting for a wake-up
        started = time.monotonic()
        reconciler._wake.set()
        await asyncio.wait_for(reconciler.stop(), 20)
        assert time.monotonic() - started < 10
