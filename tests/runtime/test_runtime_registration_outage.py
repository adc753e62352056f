"""A runtime that comes up while etcd does not answer serves anyway and registers its endpoint once etcd is back."""

from __future__ import annotations

import asyncio
import time

import pytest

from clowder.runtime.v1 import runtime_pb2
from clowder_common.etcd import EtcdState
from clowder_common.etcd_server import start_etcd
from clowder_runtime.registration import EndpointRegistration

pytestmark = pytest.mark.processes


async def test_registration_waits_for_a_paused_etcd_instead_of_failing(tmp_path):
    etcd = start_etcd(tmp_path / "etcd", log_path=tmp_path / "etcd.log")
    state = EtcdState([etcd.endpoint], "/reg/")
    await state.connect()
    endpoint = runtime_pb2.Endpoint(deployment="d", replica_id="r1", address="127.0.0.1:1", node="n")
    registration = EndpointRegistration((etcd.endpoint,), "/reg/", endpoint, ttl_s=2)
    try:
        etcd.pause()
        started = time.monotonic()
        await asyncio.wait_for(registration.start(), 30)  # returns: the runtime goes on serving
        assert time.monotonic() - started < 15
        assert not registration.registered
        etcd.resume()
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and not registration.registered:
            await asyncio.sleep(0.1)
        assert registration.registered
        stored = await state.get(registration.key, runtime_pb2.Endpoint)
        assert stored is not None and stored.value == endpoint
        await registration.stop()
        assert await state.get(registration.key, runtime_pb2.Endpoint) is None
    finally:
        etcd.resume()
        await registration.stop()
        await state.close()
        etcd.stop()
