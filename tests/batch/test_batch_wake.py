"""A batch for a deployment scaled to zero wakes it, as an interactive request does, and runs to completion."""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from clowder.controller.v1 import resources_pb2
from clowder_common import keys

from batch_helpers import chat_lines, jsonl
from helpers.records import replicas_of
from helpers.runtimes import openai_client
from helpers.services import services_in_process

pytestmark = pytest.mark.processes

TOKEN = "batch-wake-test-token"


async def test_a_batch_wakes_a_deployment_at_zero(etcd, etcd_prefix, state, tmp_path, model_path):
    # The admin token lets the balancer keep batch files in the storage node.
    async with services_in_process(etcd.endpoint, etcd_prefix, tmp_path, TOKEN, node=dict(lease_ttl_s=2),
                                   controller=dict(runtime_threads=1, runtime_stop_grace_s=3,
                                                   autoscale_interval_s=0.3, scale_down_window_s=1),
                                   balancer=dict(ready_timeout_s=120, drain_grace_s=3, name="b1",
                                                 load_report_interval_s=0.3),
                                   balancer_admin_token=TOKEN) as services, \
            openai_client(services.balancer) as client:
        await state.put(state.key(keys.image("smol")), resources_pb2.Image(alias="smol",
                                                                           source_url=model_path.as_uri()))
        await state.put(state.key(keys.deployment("smol")), resources_pb2.Deployment(
            name="smol", image="smol", replicas=0, min_replicas=0, max_replicas=1, target_in_flight=4,
            scale_to_zero_after_s=60))
        deadline = time.monotonic() + 30
        while "smol" not in [m.id for m in (await client.models.list()).data]:
            assert time.monotonic() < deadline, "the balancer never saw the deployment"
            await asyncio.sleep(0.1)
        assert await replicas_of(state, "smol") == []

        source = await client.files.create(file=("wake.jsonl", jsonl(chat_lines(3))), purpose="batch")
        batch = await client.batches.create(input_file_id=source.id, endpoint="/v1/chat/completions",
                                            completion_window="24h")
        deadline = time.monotonic() + 240
        while batch.status not in ("completed", "failed", "cancelled", "expired"):
            assert time.monotonic() < deadline, f"the batch did not end: {batch}"
            await asyncio.sleep(0.5)
            batch = await client.batches.retrieve(batch.id)
        assert batch.status == "completed" and batch.request_counts.completed == 3, batch
        output = (await client.files.content(batch.output_file_id)).text.splitlines()
        assert sorted(json.loads(line)["custom_id"] for line in output) == ["req-0", "req-1", "req-2"]
        woken = await replicas_of(state, "smol")
        assert len(woken) == 1 and woken[0].state == resources_pb2.REPLICA_STATE_READY
