"""Limits, budgets, usage and fairness through two real balancers on one etcd and a real runtime."""

from __future__ import annotations

import asyncio
import json
import time
import uuid

import pytest

from clowder.balancer.v1 import apikeys_pb2
from clowder_cli.main import main as clowder_main

from tenancy_helpers import ADMIN, MODEL
from helpers.sse import sse_events
from helpers.wait import wait_for

pytestmark = pytest.mark.processes

CHAT = [{"role": "user", "content": "Say hello."}]


def _url(app, path: str = "/v1/chat/completions") -> str:
    return f"http://127.0.0.1:{app.http_port}{path}"


async def _chat(http, app, secret: str, **body) -> tuple[int, dict, dict]:
    payload = {"model": MODEL, "messages": CHAT, "max_tokens": 1, "temperature": 0, **body}
    async with http.post(_url(app), json=payload, headers={"Authorization": f"Bearer {secret}"}) as response:
        text = await response.text()
        if body.get("stream") and response.status == 200:
            events = [e for e in sse_events(text) if isinstance(e, dict)]
            usage = next((e["usage"] for e in events if e.get("usage")), None)
            return response.status, {"usage": usage, "events": events}, dict(response.headers)
        return response.status, json.loads(text), dict(response.headers)


async def test_a_key_with_10_rpm_gets_10_requests_through_both_balancers_together(balancers, http, make_key):
    _, secret = await make_key(requests_per_minute=10)
    results = await asyncio.gather(*(_chat(http, balancers[i % 2], secret) for i in range(20)))
    statuses = [status for status, _, _ in results]
    assert statuses.count(200) == 10, statuses
    assert statuses.count(429) == 10, statuses
    _, body, headers = next(r for r in results if r[0] == 429)
    assert body["error"]["type"] == "rate_limit_error" and body["error"]["code"] == "rate_limit_exceeded"
    assert int(headers["Retry-After"]) >= 1


async def test_a_budget_stops_a_key_across_both_balancers_within_the_tolerance(balancers, http, make_key):
    budget = 400
    _, secret = await make_key(budget_tokens=budget, budget_period=apikeys_pb2.BUDGET_PERIOD_DAY)
    used = 0
    refused = None
    # Rounds of concurrent requests on both balancers: concurrency must not get past the budget.
    for _ in range(20):
        results = await asyncio.gather(*(_chat(http, balancers[i % 2], secret, max_tokens=24) for i in range(6)))
        for status, body, headers in results:
            if status == 200:
                used += body["usage"]["total_tokens"]
            else:
                assert status == 429, body
                refused = (body, headers)
        if refused:
            break
    assert refused is not None, f"{used} tokens used and never refused"
    body, headers = refused
    assert body["error"]["type"] == "insufficient_quota" and body["error"]["code"] == "insufficient_quota"
    assert int(headers["Retry-After"]) >= 1
    # Tolerance: the prompts' estimates (chars/4 + 4 per message, ~10 tokens here) may be off per request.
    assert budget * 0.8 <= used <= budget * 1.1, used
    for app in balancers:
        status, body, _ = await _chat(http, app, secret)
        assert status == 429 and body["error"]["code"] == "insufficient_quota"


async def test_usage_equals_the_sum_of_the_usage_clients_received(balancers, http, make_key):
    key_id, secret = await make_key()
    received = {"prompt_tokens": 0, "completion_tokens": 0, "cached_tokens": 0, "requests": 0}

    def add(usage: dict) -> None:
        received["prompt_tokens"] += usage["prompt_tokens"]
        received["completion_tokens"] += usage["completion_tokens"]
        received["cached_tokens"] += usage["prompt_tokens_details"]["cached_tokens"]
        received["requests"] += 1

    calls = []
    for i in range(3):
        for app in balancers:
            calls.append(_chat(http, app, secret, max_tokens=5 + i))
            calls.append(_chat(http, app, secret, max_tokens=4 + i, n=2, temperature=1.0))
            calls.append(_chat(http, app, secret, max_tokens=6, stream=True, stream_options={"include_usage": True}))
            calls.append(_chat(http, app, secret, max_tokens=3, n=2, temperature=1.0, stream=True,
                               stream_options={"include_usage": True}))
    for status, body, _ in await asyncio.gather(*calls):
        assert status == 200, body
        add(body["usage"])

    async def recorded() -> dict:
        async with http.get(_url(balancers[1], "/api/v1/usage"), params={"key": key_id},
                            headers={"Authorization": f"Bearer {ADMIN}"}) as response:
            assert response.status == 200, await response.text()
            return await response.json()

    async def flushed() -> bool:
        return int((await recorded()).get("requests", 0)) >= received["requests"]
    await wait_for(flushed, timeout=15, what="usage flushed by both balancers")
    usage = await recorded()
    assert int(usage["requests"]) == received["requests"]
    assert int(usage["promptTokens"]) == received["prompt_tokens"]
    assert int(usage["completionTokens"]) == received["completion_tokens"]
    assert int(usage.get("cachedPromptTokens", 0)) == received["cached_tokens"]
    (record,) = usage["records"]
    assert record["model"] == MODEL and record["groups"] == ["team"]
    assert record["date"] == time.strftime("%Y-%m-%d", time.gmtime())
    # Filters: another group or model finds nothing.
    async with http.get(_url(balancers[0], "/api/v1/usage"), params={"key": key_id, "group": "other"},
                        headers={"Authorization": f"Bearer {ADMIN}"}) as response:
        assert (await response.json()).get("records", []) == []
    # And the balancers' Prometheus counters add up to the same.
    total = 0.0
    for app in balancers:
        total += app.metrics.registry.get_sample_value(
            "clowder_balancer_usage_tokens_total", {"key": key_id, "model": MODEL, "kind": "completion"}) or 0
    assert total == received["completion_tokens"]


async def test_under_saturation_a_small_tenant_is_not_starved_by_a_burst(balancers, http, make_key):
    """50 requests from A, then 5 from B, on one balancer: B's all finish before A's last 40."""
    _, a = await make_key()
    _, b = await make_key()
    app = balancers[0]
    done: list[str] = []

    async def one(tenant: str, secret: str) -> None:
        status, body, _ = await _chat(http, app, secret, max_tokens=6)
        assert status == 200, body
        done.append(tenant)

    burst = [asyncio.create_task(one("a", a)) for _ in range(50)]
    await wait_for(lambda: app.tenancy.queue.depth(MODEL) >= 40, timeout=30, what="A's burst queued")
    small = [asyncio.create_task(one("b", b)) for _ in range(5)]
    await asyncio.wait_for(asyncio.gather(*burst, *small), timeout=240)
    last_b = max(i for i, tenant in enumerate(done) if tenant == "b")
    a_before = done[:last_b].count("a")
    assert a_before <= 10, done
    text = app.metrics.render().decode()
    assert "clowder_balancer_queue_wait_seconds_count" in text and "clowder_balancer_queue_depth" in text


async def test_a_groups_limit_holds_all_its_keys_together_across_both_balancers(balancers, http, make_key):
    group = f"g{uuid.uuid4().hex[:6]}"
    async with http.put(_url(balancers[0], f"/api/v1/grouplimits/{group}"),
                        json={"limits": {"requestsPerMinute": 4, "priority": "PRIORITY_CLASS_CRITICAL"}},
                        headers={"Authorization": f"Bearer {ADMIN}"}) as response:
        assert response.status == 200, await response.text()
    for app in balancers:
        await wait_for(lambda a=app: a.tenancy.groups.limits(group).rpm == 4, what="the group's limits")
    first = await make_key(groups=[group])
    second = await make_key(groups=[group])
    results = await asyncio.gather(*(_chat(http, balancers[i % 2], (first, second)[i // 2 % 2][1])
                                     for i in range(12)))
    statuses = [status for status, _, _ in results]
    assert statuses.count(200) == 4 and statuses.count(429) == 8, statuses
    # The group's class is its keys' (they set none of their own).
    principal = balancers[0].api_keys.authenticate(first[1], required=True)
    assert balancers[0].tenancy.priority(principal) == apikeys_pb2.PRIORITY_CLASS_CRITICAL
    async with http.get(_url(balancers[1], "/api/v1/grouplimits"),
                        headers={"Authorization": f"Bearer {ADMIN}"}) as response:
        listed = {g["group"]: g["limits"] for g in (await response.json())["groupLimits"]}
    assert listed[group]["requestsPerMinute"] == 4


async def test_cli_sets_limits_and_reads_usage(balancers, http, make_key, monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("CLOWDER_ADMIN_TOKEN", ADMIN)
    key_id, secret = await make_key()
    base = ["--data-dir", str(tmp_path)]
    address = f"127.0.0.1:{balancers[0].grpc_port}"

    def cli(*args: str) -> int:
        return clowder_main([*base, *args])

    # The CLI is synchronous: run it off the loop the balancers serve on.
    assert await asyncio.to_thread(cli, "apikey", "--balancer", address, "update", key_id, "--rpm", "2",
                                   "--budget-tokens", "5000", "--budget-period", "month", "--priority",
                                   "sheddable") == 0
    assert "2 rpm, 5000 tokens/month" in capsys.readouterr().out
    for app in balancers:
        await wait_for(lambda a=app: a.api_keys.authenticate(secret, required=True).limits.rpm == 2,
                         what="the new limits everywhere")
    statuses = [(await _chat(http, balancers[i % 2], secret))[0] for i in range(3)]
    assert statuses == [200, 200, 429]
    assert await asyncio.to_thread(cli, "apikey", "--balancer", address, "ls") == 0
    assert "sheddable" in capsys.readouterr().out

    async def counted() -> bool:
        reply = await asyncio.to_thread(cli, "usage", "--balancer", address, "--key", key_id, "--json")
        out = capsys.readouterr().out
        return reply == 0 and json.loads(out)["requests"] in ("2", 2)
    await wait_for(counted, timeout=15, what="usage of the two requests")


async def test_a_stream_the_client_cuts_short_is_counted_up_to_what_it_was_sent(balancers, http, make_key):
    key_id, secret = await make_key()
    app = balancers[0]
    payload = {"model": MODEL, "messages": [{"role": "user", "content": "Write a long story about a cat."}],
               "max_tokens": 400, "temperature": 0, "stream": True}
    received = 0
    async with http.post(_url(app), json=payload, headers={"Authorization": f"Bearer {secret}"}) as response:
        assert response.status == 200
        async for line in response.content:
            if line.startswith(b"data: {") and json.loads(line[6:])["choices"][0]["delta"].get("content"):
                received += 1
                if received == 5:
                    break
        # Leaving the block closes the connection: the client hangs up mid-stream, with no usage sent to it.
        response.close()

    async def recorded() -> dict:
        async with http.get(_url(app, "/api/v1/usage"), params={"key": key_id},
                            headers={"Authorization": f"Bearer {ADMIN}"}) as reply:
            assert reply.status == 200, await reply.text()
            return await reply.json()

    async def counted() -> bool:
        return int((await recorded()).get("requests", 0)) == 1
    await wait_for(counted, timeout=15, what="the cut stream's usage")
    usage = await recorded()
    assert int(usage["promptTokens"]) > 0
    # At least what the client read; beyond it only the messages in flight when it hung up, far from the 400
    # it asked for (each content chunk carries one token or more).
    assert received <= int(usage["completionTokens"]) < received + 64
