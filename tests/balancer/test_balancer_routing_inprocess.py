"""Routing, outlier detection and load reports of an in-process balancer in front of scripted runtimes."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from clowder.balancer.v1 import inference_pb2, inference_pb2_grpc, load_pb2
from clowder.runtime.v1 import runtime_pb2
from clowder_common import keys
from clowder_common.errors import Internal

from balancer_helpers import ScriptedRuntime, speak
from helpers.records import put_deployment, put_endpoint
from helpers.wait import wait_for

pytestmark = pytest.mark.inprocess


class Waiting(ScriptedRuntime):
    """A scripted runtime that reports a queue of `queued` requests in GetStats."""

    queued = 0

    async def GetStats(self, request, context):
        return runtime_pb2.GetStatsResponse(num_requests_running=self.running, num_requests_waiting=self.queued)


async def cluster(state, make_balancer, runtimes, behaviours, cls=ScriptedRuntime, deployment="d", **overrides):
    await put_deployment(state, deployment)
    started = []
    for i, behaviour in enumerate(behaviours):
        runtime = await runtimes(behaviour, cls)
        await put_endpoint(state, deployment, f"r{i}", runtime.address)
        started.append(runtime)
    app = await make_balancer(**overrides)
    await wait_for(lambda: len(app.discovery.endpoints(deployment)) == len(behaviours), what="endpoints")
    return app, started


async def chat(http, app, messages, headers=None, model="d") -> int:
    url = f"http://127.0.0.1:{app.http_port}/v1/chat/completions"
    async with http.post(url, json={"model": model, "messages": messages}, headers=headers or {}) as resp:
        await resp.read()
        return resp.status


def served(runtimes_: list[ScriptedRuntime]) -> list[int]:
    return [len(r.requests) for r in runtimes_]


async def test_session_header_pins_a_conversation_to_one_replica(state, make_balancer, runtimes, http):
    app, rts = await cluster(state, make_balancer, runtimes, [speak(["ok"])] * 3)
    for session in ("alpha", "beta", "gamma"):
        before = served(rts)
        for _ in range(4):
            assert await chat(http, app, [{"role": "user", "content": "hi"}], {"x-session-id": session}) == 200
        grew = [after - b for after, b in zip(served(rts), before)]
        assert sorted(grew) == [0, 0, 4], f"session {session} spread over replicas: {grew}"


async def test_grpc_session_metadata_pins_too(state, make_balancer, runtimes):
    app, rts = await cluster(state, make_balancer, runtimes, [speak(["ok"])] * 3)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.grpc_port}") as channel:
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        request = inference_pb2.CreateChatCompletionRequest(
            model="d", messages=[runtime_pb2.ChatMessage(role="user", content="hi")])
        for _ in range(4):
            chunks = [c async for c in stub.CreateChatCompletion(request, metadata=(("x-session-id", "s"),),
                                                                   timeout=10)]
            assert chunks[-1].finish_reason == runtime_pb2.FINISH_REASON_STOP
    assert sorted(served(rts)) == [0, 0, 4]


async def test_next_turn_of_a_conversation_goes_where_its_prefix_is(state, make_balancer, runtimes, http):
    app, rts = await cluster(state, make_balancer, runtimes, [speak(["An answer."])] * 3)
    for topic in ("apples", "boats", "clouds", "dunes"):
        history = [{"role": "system", "content": f"You are an expert on {topic}. " * 30},
                   {"role": "user", "content": f"Tell me about {topic}."}]
        before = served(rts)
        for turn in range(3):
            assert await chat(http, app, history) == 200
            history += [{"role": "assistant", "content": "An answer."}, {"role": "user", "content": f"More {turn}"}]
        grew = [after - b for after, b in zip(served(rts), before)]
        assert sorted(grew) == [0, 0, 3], f"conversation about {topic} moved between replicas: {grew}"


async def test_replica_reporting_a_queue_is_avoided(state, make_balancer, runtimes, http):
    app, rts = await cluster(state, make_balancer, runtimes, [speak(["ok"])] * 2, cls=Waiting,
                             stats_interval_s=0.05)
    rts[0].queued = 50
    await wait_for(lambda: app.router.stats.get(rts[0].address).waiting == 50, what="stats poll")
    for _ in range(6):
        assert await chat(http, app, [{"role": "user", "content": "hi"}]) == 200
    assert served(rts) == [0, 6]


async def test_embedding_batches_take_the_same_path_and_spread_by_load(state, make_balancer, runtimes):
    app, rts = await cluster(state, make_balancer, runtimes, [speak(["unused"])] * 3)
    # 600 inputs are three runtime batches sent at once: each is routed while the others are in flight, so the
    # `embeddings` profile's load scorer sends each to a replica of its own.
    inputs = [f"text {i}" for i in range(600)]
    reply = await app.router.embed("d", runtime_pb2.EmbedRequest(request_id="e", inputs=inputs))
    assert len(reply.embeddings) == 600
    assert served(rts) == [1, 1, 1]
    assert app.router.total_in_flight == 0


async def test_failing_replica_is_ejected_then_recovers(state, make_balancer, runtimes, http):
    broken = {"on": True}

    def flaky():
        async def behaviour(request, context):
            if broken["on"]:
                raise Internal("the model crashed")
            yield runtime_pb2.GenerateResponse(text="fine")
            yield runtime_pb2.GenerateResponse(finish_reason=runtime_pb2.FINISH_REASON_STOP,
                                               usage=runtime_pb2.Usage(prompt_tokens=1, completion_tokens=1))
        return behaviour

    app, rts = await cluster(state, make_balancer, runtimes, [flaky(), speak(["ok"])], routing_profile="round-robin",
                             outlier_consecutive_failures=2, outlier_base_ejection_s=1.0)
    statuses = [await chat(http, app, [{"role": "user", "content": "hi"}]) for _ in range(4)]
    # Round-robin alternates: r0 fails twice (ejected after the second), r1 serves twice.
    assert sorted(statuses) == [200, 200, 500, 500]
    assert app.router.outliers.ejected(rts[0].address)
    text = app.metrics.render().decode()
    assert 'clowder_balancer_ejections_total{model="d",replica="r0"} 1.0' in text
    before = served(rts)
    for _ in range(4):
        assert await chat(http, app, [{"role": "user", "content": "hi"}]) == 200
    assert served(rts)[0] == before[0], "an ejected replica got traffic"
    broken["on"] = False
    await wait_for(lambda: not app.router.outliers.ejected(rts[0].address), timeout=5, what="ejection to end")
    for _ in range(4):
        assert await chat(http, app, [{"role": "user", "content": "hi"}]) == 200
    assert served(rts)[0] > before[0], "the replica never came back"


async def _load(state, name: str) -> load_pb2.BalancerLoad | None:
    found = await state.get(state.key(keys.load(name)), load_pb2.BalancerLoad)
    return found.value if found else None


async def test_load_report_counts_in_flight_waiting_and_totals(state, make_balancer, runtimes, http):
    gate = asyncio.Event()

    async def held(request, context):
        await gate.wait()
        yield runtime_pb2.GenerateResponse(text="x", finish_reason=runtime_pb2.FINISH_REASON_STOP,
                                           usage=runtime_pb2.Usage(prompt_tokens=1, completion_tokens=1))

    app, _ = await cluster(state, make_balancer, runtimes, [held], name="bal-1", load_report_interval_s=0.1,
                           ready_timeout_s=10)
    await put_deployment(state, "cold")
    first = asyncio.create_task(chat(http, app, [{"role": "user", "content": "hi"}]))
    cold = asyncio.create_task(chat(http, app, [{"role": "user", "content": "hi"}], model="cold"))

    async def report_shows(pred) -> bool:
        report = await _load(state, "bal-1")
        return report is not None and pred(report)

    await wait_for(lambda: report_shows(
        lambda r: r.deployments["d"].in_flight == 1 and r.deployments["cold"].waiting == 1), what="busy report")
    report = await _load(state, "bal-1")
    assert report.balancer == "bal-1"
    assert report.deployments["d"].requests_total == 1 and report.deployments["cold"].requests_total == 1
    assert report.deployments["cold"].in_flight == 0
    assert report.deployments["d"].last_request_time.seconds > 0
    # A replica appears for the cold deployment (the controller woke it): the held request goes through.
    late = await runtimes(speak(["awake"]))
    await put_endpoint(state, "cold", "r0", late.address)
    assert await cold == 200
    gate.set()
    assert await first == 200
    await wait_for(lambda: report_shows(
        lambda r: r.deployments["d"].in_flight == 0 and r.deployments["cold"].waiting == 0), what="idle report")
    await app.stop()
    assert await _load(state, "bal-1") is None, "the report outlived its balancer"


async def test_unknown_model_is_not_reported(state, make_balancer, runtimes, http):
    app, _ = await cluster(state, make_balancer, runtimes, [speak(["ok"])], name="bal-2", load_report_interval_s=0.1)
    assert await chat(http, app, [{"role": "user", "content": "hi"}], model="no-such-model") == 404
    assert await chat(http, app, [{"role": "user", "content": "hi"}]) == 200

    async def counted() -> bool:
        report = await _load(state, "bal-2")
        return report is not None and report.deployments["d"].requests_total == 1

    await wait_for(counted, what="report")
    assert "no-such-model" not in (await _load(state, "bal-2")).deployments


async def test_latency_metrics_per_model_and_replica(state, make_balancer, runtimes, http):
    app, _ = await cluster(state, make_balancer, runtimes, [speak(["a", "b", "c"], delay=0.02)])
    assert await chat(http, app, [{"role": "user", "content": "hi"}]) == 200
    text = app.metrics.render().decode()
    # Messages after the first: "b", "c" and the final one.
    assert 'clowder_balancer_inter_token_latency_seconds_count{model="d"} 3.0' in text
    assert 'clowder_balancer_replica_time_to_first_token_seconds_count{model="d",replica="r0"} 1.0' in text
    assert 'clowder_balancer_tokens_per_second_count{model="d",replica="r0"} 1.0' in text
    tps_sum = float(next(line for line in text.splitlines()
                         if line.startswith('clowder_balancer_tokens_per_second_sum{model="d",replica="r0"}')).split()[1])
    # 2 tokens after the first over at least 2 x 20 ms: at most 50 tokens/s, and some.
    assert 0 < tps_sum <= 50


async def test_stream_that_stalls_after_its_first_token_with_no_other_replica_ends_with_an_error_event(
        state, make_balancer, runtimes, http):
    async def stall(request, context):
        yield runtime_pb2.GenerateResponse(text="a")
        await asyncio.sleep(30)
        yield runtime_pb2.GenerateResponse(text="never")

    app, rts = await cluster(state, make_balancer, runtimes, [stall], stream_idle_timeout_s=0.3)
    url = f"http://127.0.0.1:{app.http_port}/v1/chat/completions"
    loop = asyncio.get_running_loop()
    started = loop.time()
    async with http.post(url, json={"model": "d", "messages": [{"role": "user", "content": "hi"}],
                                    "stream": True}) as resp:
        assert resp.status == 200
        body = await resp.text()
    assert loop.time() - started < 5
    assert '"content":"a"' in body and '"code":"stream_idle_timeout"' in body and body.endswith("data: [DONE]\n\n")
    await wait_for(lambda: rts[0].cancelled == 1, what="runtime call cancelled")


async def test_access_log_line_names_request_and_replica(state, make_balancer, runtimes, http, caplog):
    app, _ = await cluster(state, make_balancer, runtimes, [speak(["ok"])])
    with caplog.at_level("INFO", logger="clowder_balancer.http_api"):
        assert await chat(http, app, [{"role": "user", "content": "hi"}], {"x-request-id": "log-me"}) == 200
    lines = [r.getMessage() for r in caplog.records if r.name == "clowder_balancer.http_api"]
    assert any("request_id=log-me" in line and "status=200" in line and "replica=r0" in line for line in lines), lines
