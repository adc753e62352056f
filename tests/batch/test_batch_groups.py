"""Each batch line passes the aimage's middleware under the key that created the batch: groups decide."""

from __future__ import annotations

import asyncio
import json
import time

import openai
import pytest

from clowder.controller.v1 import resources_pb2
from clowder_balancer.app import create_balancer
from clowder_common import keys
from clowder_storage.app import create_storage

from batch_helpers import chat_lines, jsonl
from helpers.configs import balancer_config, storage_config

pytestmark = pytest.mark.inprocess

TOKEN = "batch-groups-test-token"


async def _run_batch(port: int, api_key: str) -> list[dict]:
    client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=api_key, timeout=60, max_retries=0)
    try:
        source = await client.files.create(file=("g.jsonl", jsonl(chat_lines(2))), purpose="batch")
        batch = await client.batches.create(input_file_id=source.id, endpoint="/v1/chat/completions",
                                            completion_window="24h")
        deadline = time.monotonic() + 120
        while batch.status != "completed":
            assert time.monotonic() < deadline, f"the batch did not complete: {batch}"
            await asyncio.sleep(0.3)
            batch = await client.batches.retrieve(batch.id)
        assert batch.output_file_id is None and batch.request_counts.failed == 2, batch
        return [json.loads(line) for line in (await client.files.content(batch.error_file_id)).text.splitlines()]
    finally:
        await client.close()


async def test_lines_run_under_the_creators_key_and_groups(etcd, etcd_prefix, state, tmp_path):
    node = await create_storage(storage_config(etcd.endpoint, etcd_prefix, tmp_path / "n1", "n1", lease_ttl_s=2), TOKEN)
    await node.start()
    # A short wait for a replica: the allowed key's lines get as far as routing, where no replica is ready.
    balancer = await create_balancer(balancer_config(etcd.endpoint, etcd_prefix, ready_timeout_s=1, drain_grace_s=1,
                                                     name="b1"), admin_token=TOKEN)
    await balancer.start()
    try:
        image = resources_pb2.Image(alias="smol", source_url="file:///unused.gguf")
        image.configuration.allowed_groups.append("vip")
        await state.put(state.key(keys.image("smol")), image)
        await state.put(state.key(keys.deployment("smol")), resources_pb2.Deployment(name="smol", image="smol"))
        _, vip = await balancer.api_keys.create("vip", ["vip"])
        _, other = await balancer.api_keys.create("other", ["other"])
        deadline = time.monotonic() + 30
        while len(balancer.api_keys.cache.items) < 2 or not balancer.discovery.has_model("smol"):
            assert time.monotonic() < deadline, "the balancer never saw the keys and the deployment"
            await asyncio.sleep(0.1)

        # A file larger than the JSON body limit (4 MiB) is still taken: uploads have their own limit.
        big = b"x" * (5 * 1024 * 1024)
        uploader = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{balancer.http_port}/v1", api_key=other,
                                      timeout=60, max_retries=0)
        try:
            stored = await uploader.files.create(file=("big.jsonl", big), purpose="batch")
            assert stored.bytes == len(big) and (await uploader.files.content(stored.id)).content == big
        finally:
            await uploader.close()

        refused = await _run_batch(balancer.http_port, other)
        assert {(line["response"]["status_code"], line["response"]["body"]["error"]["code"]) for line in refused} \
            == {(403, "group_not_allowed")}
        anonymous = await _run_batch(balancer.http_port, "not-a-clowder-key")
        assert {line["response"]["status_code"] for line in anonymous} == {401}
        # The vip key passes the groups stage; its lines fail later, for want of a replica (retried, then kept).
        allowed = await _run_batch(balancer.http_port, vip)
        assert {(line["response"]["status_code"], line["response"]["body"]["error"]["code"]) for line in allowed} \
            == {(503, "no_ready_replica")}
    finally:
        await balancer.stop()
        await node.stop()
