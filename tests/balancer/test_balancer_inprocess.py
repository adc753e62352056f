"""The balancer in-process on port 0 against real etcd, with scripted runtimes for the failure paths."""

from __future__ import annotations

import asyncio
import json
import re
import time

import aiohttp
import grpc
import pytest
from grpc_status import rpc_status
from google.rpc import error_details_pb2

from clowder.balancer.v1 import inference_pb2, inference_pb2_grpc
from clowder.runtime.v1 import runtime_pb2
from clowder_common import keys
from clowder_common.errors import InvalidArgument, ResourceExhausted, Unavailable
from clowder_common.plugins import Plugin
from clowder_common.processes import free_port

from clowder_balancer.routing.base import Candidate, Picker
from clowder_balancer.routing.registry import builtin_plugins

from balancer_helpers import fail, speak
from helpers.records import put_deployment, put_endpoint
from helpers.wait import wait_for

pytestmark = pytest.mark.inprocess

CHAT = {"model": "d", "messages": [{"role": "user", "content": "hi"}]}


class InKeyOrder(Plugin, Picker):
    """A picker plugin that always takes the first untried replica by id, so tests know the order."""

    def pick(self, scored) -> Candidate:
        return min((c for c, _ in scored), key=lambda c: c.replica_id)


def in_key_order(tmp_path) -> dict:
    """make_balancer's arguments for routing by InKeyOrder, registered as a plugin type and used by a profile,
    like any plugin. Ejected replicas stay a last resort (a soft filter); `ready` is left out so a replica
    whose stats polls failed is still tried first."""
    plugins = builtin_plugins()
    plugins.register("picker", "in-key-order", InKeyOrder.create)
    path = tmp_path / "profiles.yaml"
    path.write_text("profiles:\n  in-key-order: {filters: [not-ejected], picker: in-key-order}\n")
    return {"plugins": plugins, "routing_profile": "in-key-order", "routing_profiles_file": str(path)}


def url(app, path: str) -> str:
    return f"http://127.0.0.1:{app.http_port}{path}"


async def serve(state, make_balancer, runtimes, *behaviours, deployment="d", **overrides):
    """Register one scripted replica per behaviour (ids r0, r1, ...) and start a balancer that sees them."""
    await put_deployment(state, deployment)
    started = []
    for i, behaviour in enumerate(behaviours):
        runtime = await runtimes(behaviour)
        await put_endpoint(state, deployment, f"r{i}", runtime.address)
        started.append(runtime)
    app = await make_balancer(**overrides)
    await wait_for(lambda: len(app.discovery.endpoints(deployment)) == len(behaviours), what="endpoints")
    return app, started


async def read_sse(response: aiohttp.ClientResponse) -> list[str]:
    """Payloads of the `data:` events, [DONE] included."""
    events = []
    async for line in response.content:
        text = line.decode().rstrip("\n")
        if text.startswith("data: "):
            events.append(text[len("data: "):])
    return events


def metric(text: str, name: str, **labels: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            found = dict(re.findall(r'(\w+)="([^"]*)"', line.split(" ")[0]))
            if all(found.get(k) == v for k, v in labels.items()):
                return float(line.rsplit(" ", 1)[1])
    return 0.0


# -- HTTP surface --------------------------------------------------------------------------------


async def test_unknown_routes_and_methods_answer_in_openai_shape(state, make_balancer, http):
    app = await make_balancer()
    async with http.get(url(app, "/v1/nothing-here")) as resp:
        assert resp.status == 404
        body = await resp.json()
        assert set(body["error"]) == {"message", "type", "param", "code"}
        assert body["error"]["type"] == "invalid_request_error" and body["error"]["code"] == "unknown_url"
        assert resp.headers["x-request-id"]
    async with http.get(url(app, "/v1/chat/completions")) as resp:
        assert resp.status == 405
        assert (await resp.json())["error"]["code"] == "method_not_allowed"


async def test_oversized_body_is_413(state, make_balancer, http):
    app = await make_balancer(max_body_bytes=64 * 1024)
    body = json.dumps({**CHAT, "messages": [{"role": "user", "content": "x" * 100_000}]})
    async with http.post(url(app, "/v1/chat/completions"), data=body,
                         headers={"Content-Type": "application/json"}) as resp:
        assert resp.status == 413
        assert (await resp.json())["error"]["code"] == "request_too_large"


async def test_invalid_body_is_400_with_param(state, make_balancer, http):
    app = await make_balancer()
    async with http.post(url(app, "/v1/chat/completions"), data=b"{not json") as resp:
        assert resp.status == 400
        error = (await resp.json())["error"]
        assert error["type"] == "invalid_request_error" and error["param"] is None
    async with http.post(url(app, "/v1/completions"), json={"model": "d", "prompt": "x", "temperature": "hot"}) as resp:
        assert resp.status == 400
        assert (await resp.json())["error"]["param"] == "temperature"


async def test_models_healthz_and_unknown_model(state, make_balancer, runtimes, http):
    app, _ = await serve(state, make_balancer, runtimes, speak(["a"]))
    await put_deployment(state, "other")
    await wait_for(lambda: app.discovery.has_model("other"), what="second deployment")
    async with http.get(url(app, "/v1/models")) as resp:
        body = await resp.json()
    assert body["object"] == "list"
    assert [m["id"] for m in body["data"]] == ["d", "other"]
    assert all(m["object"] == "model" and m["owned_by"] == "clowder" and "created" in m for m in body["data"])
    async with http.get(url(app, "/v1/models/d")) as resp:
        assert resp.status == 200 and (await resp.json())["id"] == "d"
    async with http.post(url(app, "/v1/chat/completions"), json={**CHAT, "model": "nope"}) as resp:
        assert resp.status == 404
        assert (await resp.json())["error"]["code"] == "model_not_found"
    async with http.get(url(app, "/healthz")) as resp:
        assert resp.status == 200


async def test_request_id_is_kept_or_made_and_reaches_the_runtime(state, make_balancer, runtimes, http):
    app, (runtime,) = await serve(state, make_balancer, runtimes, speak(["a"]))
    async with http.post(url(app, "/v1/chat/completions"), json=CHAT, headers={"x-request-id": "req-42"}) as resp:
        assert resp.status == 200
        assert resp.headers["x-request-id"] == "req-42"
    assert runtime.requests[-1].request_id == "req-42"
    assert runtime.metadata[-1]["x-request-id"] == "req-42"
    async with http.post(url(app, "/v1/chat/completions"), json=CHAT,
                         headers={"x-request-id": "bad id\twith spaces"}) as resp:
        made = resp.headers["x-request-id"]
    assert re.fullmatch(r"[0-9a-f]{32}", made)
    assert runtime.requests[-1].request_id == made


# -- waiting for replicas --------------------------------------------------------------------------


async def test_deployment_without_replica_is_503_after_ready_timeout(state, make_balancer, http):
    await put_deployment(state, "d")
    app = await make_balancer(ready_timeout_s=0.5)
    await wait_for(lambda: app.discovery.has_model("d"))
    started = time.monotonic()
    async with http.post(url(app, "/v1/chat/completions"), json=CHAT) as resp:
        assert resp.status == 503
        assert (await resp.json())["error"]["code"] == "no_ready_replica"
        assert int(resp.headers["Retry-After"]) >= 1
    assert time.monotonic() - started >= 0.5


async def test_request_waits_for_a_replica_to_register(state, make_balancer, runtimes, http):
    await put_deployment(state, "d")
    app = await make_balancer(ready_timeout_s=10)
    await wait_for(lambda: app.discovery.has_model("d"))
    runtime = await runtimes(speak(["late"]))

    async def register_later():
        await asyncio.sleep(0.4)
        await put_endpoint(state, "d", "r0", runtime.address)

    registering = asyncio.create_task(register_later())
    async with http.post(url(app, "/v1/completions"), json={"model": "d", "prompt": "x"}) as resp:
        assert resp.status == 200
        assert (await resp.json())["choices"][0]["text"] == "late"
    await registering


# -- routing and failover --------------------------------------------------------------------------


async def test_concurrent_requests_spread_by_least_in_flight(state, make_balancer, runtimes, http):
    app, (a, b) = await serve(state, make_balancer, runtimes, speak(["x"] * 5, delay=0.1), speak(["x"] * 5, delay=0.1))

    async def one():
        async with http.post(url(app, "/v1/chat/completions"), json=CHAT) as resp:
            assert resp.status == 200

    await asyncio.gather(*(one() for _ in range(4)))
    # Each request is routed while the others are still running, so the counts alternate.
    assert (len(a.requests), len(b.requests)) == (2, 2)
    assert app.router.total_in_flight == 0


async def test_full_replica_is_skipped_before_the_first_token(state, make_balancer, runtimes, http, tmp_path):
    app, (full, ok) = await serve(state, make_balancer, runtimes,
                                  fail(ResourceExhausted("queue full")), speak(["served"]), **in_key_order(tmp_path))
    async with http.post(url(app, "/v1/completions"), json={"model": "d", "prompt": "x"}) as resp:
        assert resp.status == 200
        assert (await resp.json())["choices"][0]["text"] == "served"
    assert len(full.requests) == 1 and len(ok.requests) == 1
    async with http.get(url(app, "/metrics")) as resp:
        assert metric(await resp.text(), "clowder_balancer_retries_total", model="d") == 1


async def test_retries_are_bounded_and_relay_the_last_error(state, make_balancer, runtimes, http):
    app, replicas = await serve(state, make_balancer, runtimes, *[fail(ResourceExhausted("queue full"))] * 3,
                                max_attempts=2)
    async with http.post(url(app, "/v1/chat/completions"), json=CHAT) as resp:
        assert resp.status == 429
        assert (await resp.json())["error"]["code"] == "resource_exhausted"
    assert sorted(len(r.requests) for r in replicas) == [0, 1, 1]


async def test_refused_connection_fails_over_and_cools_the_replica_down(state, make_balancer, runtimes, http,
                                                                        tmp_path):
    live = await runtimes(speak(["alive"]))
    await put_deployment(state, "d")
    # r0 is a registered endpoint nobody listens on: a runtime killed while its lease lives on.
    await put_endpoint(state, "d", "r0", f"127.0.0.1:{free_port()}")
    await put_endpoint(state, "d", "r1", live.address)
    app = await make_balancer(**in_key_order(tmp_path))
    await wait_for(lambda: len(app.discovery.endpoints("d")) == 2)
    for _ in range(3):
        async with http.post(url(app, "/v1/chat/completions"), json=CHAT) as resp:
            assert resp.status == 200
            assert (await resp.json())["choices"][0]["message"]["content"] == "alive"
    async with http.get(url(app, "/metrics")) as resp:
        text = await resp.text()
    # Only the first request paid for the dead replica; the cooldown kept the next ones off it.
    assert metric(text, "clowder_balancer_retries_total", model="d") == 1
    assert len(live.requests) == 3


async def test_first_token_timeout_is_504_and_cancels_the_call(state, make_balancer, runtimes, http):
    app, (slow,) = await serve(state, make_balancer, runtimes, speak(["late"], first_delay=30),
                               first_token_timeout_s=0.3)
    async with http.post(url(app, "/v1/chat/completions"), json=CHAT) as resp:
        assert resp.status == 504
        assert (await resp.json())["error"]["code"] == "first_token_timeout"
    await wait_for(lambda: slow.cancelled == 1 and slow.running == 0, what="runtime call cancelled")


async def test_runtime_invalid_argument_is_400_with_its_field(state, make_balancer, runtimes, http):
    app, _ = await serve(state, make_balancer, runtimes,
                         fail(InvalidArgument("the prompt is longer than the context", field="messages")))
    async with http.post(url(app, "/v1/chat/completions"), json={**CHAT, "stream": True}) as resp:
        assert resp.status == 400
        error = (await resp.json())["error"]
    assert error["param"] == "messages" and "longer than the context" in error["message"]


# -- streaming -----------------------------------------------------------------------------------


async def test_stream_shape_with_usage(state, make_balancer, runtimes, http):
    app, _ = await serve(state, make_balancer, runtimes, speak(["Hel", "lo"]))
    body = {**CHAT, "stream": True, "stream_options": {"include_usage": True}}
    async with http.post(url(app, "/v1/chat/completions"), json=body) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        events = await read_sse(resp)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[:-1]) == "Hello"
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 2
    assert len({c["id"] for c in chunks}) == 1


async def test_stream_broken_after_tokens_ends_with_error_event(state, make_balancer, runtimes, http):
    app, _ = await serve(state, make_balancer, runtimes, fail(Unavailable("replica died"), after=["Hel", "lo"]))
    async with http.post(url(app, "/v1/chat/completions"), json={**CHAT, "stream": True}) as resp:
        assert resp.status == 200
        events = await read_sse(resp)
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert error["type"] == "server_error" and error["message"]
    texts = [json.loads(e)["choices"][0]["delta"].get("content") for e in events[:-2]]
    assert texts == ["", "Hel", "lo"]
    async with http.get(url(app, "/metrics")) as resp:
        assert metric(await resp.text(), "clowder_balancer_requests_total", model="d", status="503") == 1


async def test_client_disconnect_cancels_the_runtime_call(state, make_balancer, runtimes, http):
    app, (runtime,) = await serve(state, make_balancer, runtimes, speak(["tok"] * 400, delay=0.05))
    resp = await http.post(url(app, "/v1/chat/completions"), json={**CHAT, "stream": True})
    assert resp.status == 200
    for _ in range(3):
        await resp.content.readline()
    assert runtime.running == 1
    resp.close()  # drops the connection mid-stream
    await wait_for(lambda: runtime.running == 0, timeout=3, what="runtime call cancelled")
    assert runtime.cancelled == 1
    await wait_for(lambda: app.router.total_in_flight == 0, timeout=3)
    async with http.get(url(app, "/metrics")) as m:
        assert metric(await m.text(), "clowder_balancer_requests_total", model="d", status="499") == 1


async def test_shutdown_lets_in_flight_streams_finish(state, make_balancer, runtimes, http):
    app, (runtime,) = await serve(state, make_balancer, runtimes, speak(["a"] * 8, delay=0.1))
    resp = await http.post(url(app, "/v1/completions"), json={"model": "d", "prompt": "x", "stream": True})
    await wait_for(lambda: runtime.running == 1)
    stopping = asyncio.create_task(app.stop())
    events = await read_sse(resp)
    await stopping
    assert events[-1] == "[DONE]"
    assert "".join(json.loads(e)["choices"][0]["text"] for e in events[:-1]) == "a" * 8
    with pytest.raises(aiohttp.ClientConnectionError):
        async with http.get(url(app, "/healthz")):
            pass


async def test_channel_of_a_vanished_endpoint_is_closed(state, make_balancer, runtimes, http):
    app, (runtime,) = await serve(state, make_balancer, runtimes, speak(["a"]))
    async with http.post(url(app, "/v1/chat/completions"), json=CHAT) as resp:
        assert resp.status == 200
    assert runtime.address in app.channels.addresses()
    await state.delete(state.key(keys.endpoint("d", "r0")))
    await wait_for(lambda: runtime.address not in app.channels.addresses(), what="channel closed")


async def test_metrics_count_requests_ttft_and_tokens(state, make_balancer, runtimes, http):
    app, _ = await serve(state, make_balancer, runtimes, speak(["a", "b", "c"]))
    async with http.post(url(app, "/v1/chat/completions"), json=CHAT) as resp:
        assert (await resp.json())["usage"] == {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6,
                                                 "prompt_tokens_details": {"cached_tokens": 0}}
    async with http.post(url(app, "/v1/chat/completions"), json={**CHAT, "model": "ghost"}) as resp:
        assert resp.status == 404
    async with http.get(url(app, "/metrics")) as resp:
        assert resp.headers["Content-Type"].startswith("text/plain")
        text = await resp.text()
    assert metric(text, "clowder_balancer_requests_total", model="d", api="http", status="200") == 1
    # Unknown names share one label value, so clients cannot grow the series without bound.
    assert metric(text, "clowder_balancer_requests_total", model="_unknown", status="404") == 1
    assert metric(text, "clowder_balancer_time_to_first_token_seconds_count", model="d") == 1
    assert metric(text, "clowder_balancer_generated_tokens_total", model="d") == 3


# -- gRPC face -----------------------------------------------------------------------------------


def _field_violations(err: grpc.aio.AioRpcError) -> list[str]:
    status = rpc_status.from_call(err)
    fields = []
    for detail in status.details if status else ():
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            fields += [v.field for v in bad.field_violations]
    return fields


async def test_grpc_completion_and_errors(state, make_balancer, runtimes):
    app, (runtime,) = await serve(state, make_balancer, runtimes, speak(["x", "y"]), ready_timeout_s=0.3)
    await put_deployment(state, "empty")
    await wait_for(lambda: app.discovery.has_model("empty"))
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.grpc_port}") as channel:
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        call = stub.CreateCompletion(
            inference_pb2.CreateCompletionRequest(model="d", prompt="p"), metadata=(("x-request-id", "g-1"),)
        )
        chunks = [c async for c in call]
        assert "".join(c.text for c in chunks) == "xy"
        assert chunks[-1].finish_reason == runtime_pb2.FINISH_REASON_STOP
        assert chunks[-1].usage.completion_tokens == 2
        assert len({c.id for c in chunks}) == 1 and chunks[0].id.startswith("cmpl-")
        assert dict(await call.initial_metadata())["x-request-id"] == "g-1"
        assert runtime.requests[-1].request_id == "g-1"

        with pytest.raises(grpc.aio.AioRpcError) as info:
            async for _ in stub.CreateCompletion(inference_pb2.CreateCompletionRequest(model="empty", prompt="p")):
                pass
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE

        bad = inference_pb2.CreateChatCompletionRequest(
            model="d", messages=[runtime_pb2.ChatMessage(role="user", content="hi")],
            sampling=runtime_pb2.SamplingParams(temperature=9),
        )
        with pytest.raises(grpc.aio.AioRpcError) as info:
            async for _ in stub.CreateChatCompletion(bad):
                pass
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert _field_violations(info.value) == ["sampling.temperature"]

        listed = await stub.ListModels(inference_pb2.ListModelsRequest())
        assert [(m.id, m.ready_replicas) for m in listed.models] == [("d", 1), ("empty", 0)]


async def test_grpc_client_cancel_cancels_the_runtime_call(state, make_balancer, runtimes):
    app, (runtime,) = await serve(state, make_balancer, runtimes, speak(["t"] * 400, delay=0.05))
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.grpc_port}") as channel:
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        call = stub.CreateCompletion(inference_pb2.CreateCompletionRequest(model="d", prompt="p"))
        for _ in range(3):
            await call.read()
        assert runtime.running == 1
        call.cancel()
        await wait_for(lambda: runtime.running == 0, timeout=3, what="runtime call cancelled")
    assert runtime.cancelled == 1
    await wait_for(lambda: app.router.total_in_flight == 0, timeout=3)
