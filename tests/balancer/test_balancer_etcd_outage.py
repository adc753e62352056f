"""The balancer through an etcd outage longer than the runtimes' lease TTL: a real etcd SIGSTOPped for 20 s and a
real runtime; requests during the pause and after it (while the runtime's endpoint is gone from etcd until it
registers again) are served, and no stream breaks."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time

import aiohttp
import pytest

from clowder_common.etcd import EtcdState
from clowder_common.etcd_server import start_etcd

from clowder_balancer.app import create_balancer

from helpers.configs import balancer_config
from helpers.records import put_deployment
from helpers.runtimes import runtime_processes
from helpers.sse import sse_events
from helpers.wait import wait_for

pytestmark = pytest.mark.processes

DEPLOYMENT = "o"
PAUSE_S = 20
# The runtime's lease: the pause outlasts it four times over, so etcd drops the endpoint when it wakes up.
LEASE_TTL_S = 5


@pytest.fixture
def own_etcd(tmp_path):
    """An etcd of this test's own: pausing the session's would stall every other test's state."""
    etcd = start_etcd(tmp_path / "etcd", log_path=tmp_path / "etcd.log")
    yield etcd
    with contextlib.suppress(ProcessLookupError):
        os.kill(etcd.proc.pid, signal.SIGCONT)
    etcd.stop()


async def test_requests_during_and_after_an_etcd_pause_longer_than_the_lease_are_served(own_etcd, model_path,
                                                                                        tmp_path):
    state = EtcdState([own_etcd.endpoint], "/outage/")
    await state.connect()
    await put_deployment(state, DEPLOYMENT)
    async with runtime_processes(state, own_etcd.endpoint, DEPLOYMENT, ["r1"], model_path, tmp_path,
                                 extra_args=("--lease-ttl", str(LEASE_TTL_S))):
        # A short ready timeout: a request that found no endpoint would fail at once instead of waiting for
        # the runtime to register again, so the test shows the fallback serving, not the wait.
        app = await create_balancer(balancer_config(own_etcd.endpoint, state.prefix, ready_timeout_s=0.5,
                                                    endpoint_grace_s=30))
        await app.start()
        try:
            await wait_for(lambda: len(app.discovery.endpoints(DEPLOYMENT)) == 1, what="the endpoint")
            url = f"http://127.0.0.1:{app.http_port}/v1/chat/completions"
            outcomes: list[tuple[float, str]] = []
            stop = asyncio.Event()

            async def client(session: aiohttp.ClientSession, max_tokens: int) -> None:
                while not stop.is_set():
                    started = time.monotonic()
                    body = {"model": DEPLOYMENT, "stream": True, "max_tokens": max_tokens,
                            "messages": [{"role": "user", "content": "Tell me about bread."}]}
                    async with session.post(url, json=body) as resp:
                        events = sse_events(await resp.text()) if resp.status == 200 else []
                    ok = (resp.status == 200 and events.count("[DONE]") == 1
                          and not any(isinstance(e, dict) and "error" in e for e in events))
                    outcomes.append((started, "ok" if ok else f"status {resp.status}: {events[-3:]}"))

            # (time, registered endpoints) at each change the balancer saw. The hook is the discovery's
            # change callback: the gap between etcd dropping the endpoint and the runtime registering it again
            # can be a few milliseconds (the runtime's refresh was waiting on etcd as it woke), too short to poll.
            changes: list[tuple[float, int]] = []
            on_change = app.discovery._on_endpoints_change

            def record() -> None:
                changes.append((time.monotonic(), len(app.discovery.registered_endpoints(DEPLOYMENT))))
                if on_change is not None:
                    on_change()

            app.discovery._on_endpoints_change = record

            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
                # Short requests back to back (one starts every fraction of a second), and longer streams.
                tasks = [asyncio.create_task(client(session, 8)), asyncio.create_task(client(session, 8)),
                         asyncio.create_task(client(session, 100))]
                try:
                    await asyncio.sleep(2)
                    os.kill(own_etcd.proc.pid, signal.SIGSTOP)
                    paused_at = time.monotonic()
                    await asyncio.sleep(PAUSE_S)
                    os.kill(own_etcd.proc.pid, signal.SIGCONT)
                    resumed_at = time.monotonic()
                    # etcd expires the lease on waking; the runtime registers again at its next refresh.
                    await wait_for(lambda: any(t > resumed_at and n == 0 for t, n in changes)
                                     and bool(app.discovery.registered_endpoints(DEPLOYMENT)),
                                     timeout=30, what="the endpoint gone and back")
                    await asyncio.sleep(2)
                finally:
                    stop.set()
                    await asyncio.wait_for(asyncio.gather(*tasks), 90)
        finally:
            await app.stop()
    await state.delete_prefix(state.prefix)
    await state.close()
    failed = [o for o in outcomes if o[1] != "ok"]
    assert not failed, f"{len(failed)} of {len(outcomes)} requests failed: {failed[:3]}"
    during = [t for t, _ in outcomes if paused_at <= t < resumed_at]
    assert len(during) >= 5, "requests ran while etcd was paused"
    assert [t for t, _ in outcomes if t > resumed_at + 1], "requests ran after the endpoint came back"
