"""Tracing: the balancer's span for a runtime call travels in gRPC metadata, so the runtime's span joins the trace."""

from __future__ import annotations

import aiohttp
import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from clowder_balancer.app import create_balancer

from balancer_helpers import ScriptedRuntime, speak
from helpers.configs import balancer_config
from helpers.records import put_deployment, put_endpoint
from helpers.wait import wait_for

pytestmark = pytest.mark.inprocess


async def test_runtime_call_carries_the_balancer_span_context(etcd, etcd_prefix, state):
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    runtime = await ScriptedRuntime(speak(["ok"])).start()
    app = await create_balancer(balancer_config(etcd.endpoint, etcd_prefix), tracer_provider=provider)
    try:
        await put_deployment(state, "d")
        await put_endpoint(state, "d", "r0", runtime.address)
        await app.start()
        await wait_for(lambda: app.discovery.endpoints("d"), what="endpoint")
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
            async with http.post(f"http://127.0.0.1:{app.http_port}/v1/chat/completions",
                                 json={"model": "d", "messages": [{"role": "user", "content": "hi"}]},
                                 headers={"x-request-id": "trace-1"}) as resp:
                assert resp.status == 200
    finally:
        await app.stop()
        await runtime.stop()
    spans = [s for s in exporter.get_finished_spans() if s.name == "balancer.generate"]
    assert len(spans) == 1
    span = spans[0]
    assert span.attributes["clowder.request_id"] == "trace-1" and span.attributes["clowder.replica"] == "r0"
    traceparent = runtime.metadata[0]["traceparent"]
    _, trace_id, parent_id, _ = traceparent.split("-")
    assert int(trace_id, 16) == span.context.trace_id and int(parent_id, 16) == span.context.span_id
    assert runtime.metadata[0]["x-request-id"] == "trace-1"
