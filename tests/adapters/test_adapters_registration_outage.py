"""Adapter changes made while etcd does not answer reach the endpoint once it does, the latest one last."""

from __future__ import annotations

import asyncio
import time

import pytest
from clowder.runtime.v1 import adapters_pb2, runtime_pb2

from clowder_common.etcd import EtcdState
from clowder_common.etcd_server import start_etcd
from clowder_runtime.registration import EndpointRegistration

pytestmark = pytest.mark.processes


async def stored_adapters(state: EtcdState, key: str) -> list[str] | None:
    found = await state.get(key, runtime_pb2.Endpoint)
    return None if found is None else [a.name for a in found.value.adapters]


async def test_adapters_set_during_an_etcd_pause_are_written_once_it_answers(tmp_path):
    etcd = start_etcd(tmp_path / "etcd", log_path=tmp_path / "etcd.log")
    state = EtcdState([etcd.endpoint], "/reg/")
    await state.connect()
    endpoint = runtime_pb2.Endpoint(deployment="d", replica_id="r1", address="127.0.0.1:1", node="n")
    registration = EndpointRegistration((etcd.endpoint,), "/reg/", endpoint, ttl_s=30)
    try:
        await registration.start()
        await registration.set_adapters([adapters_pb2.AdapterInfo(name="pirate", path="/p.gguf")])
        assert await stored_adapters(state, registration.key) == ["pirate"]

        etcd.pause()
        started = time.monotonic()
        # Bounded: a load or unload is not held up for long by etcd (the runtime serves the change at once).
        await asyncio.wait_for(registration.set_adapters([adapters_pb2.AdapterInfo(name="parrot", path="/q.gguf")]),
                               30)
        await asyncio.wait_for(registration.set_adapters([]), 30)
        assert time.monotonic() - started < 25
        etcd.resume()
        deadline = time.monotonic() + 20
        while (listed := await stored_adapters(state, registration.key)) != []:
            assert time.monotonic() < deadline, f"the endpoint still lists {listed}"
            await asyncio.sleep(0.1)
        # And stays so: no older write lands after the latest.
        await asyncio.sleep(2)
        assert await stored_adapters(state, registration.key) == []
    finally:
        etcd.resume()
        await registration.stop()
        await state.close()
        etcd.stop()
