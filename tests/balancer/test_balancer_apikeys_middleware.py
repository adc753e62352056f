"""API keys through ApiKeyService and the aimage's middleware, end to end through an in-process balancer."""

from __future__ import annotations

import asyncio
import json

import grpc
import pytest
from aiohttp import web
from grpc_status import rpc_status

from clowder.balancer.v1 import apikeys_pb2, apikeys_pb2_grpc, inference_pb2, inference_pb2_grpc
from clowder.controller.v1 import resources_pb2
from clowder.runtime.v1 import runtime_pb2
from clowder_common import keys
from clowder_common.auth import bearer_metadata

from balancer_helpers import ADMIN, speak
from helpers.records import put_deployment, put_endpoint
from helpers.wait import wait_for


pytestmark = pytest.mark.inprocess

HI = [{"role": "user", "content": "hi"}]


async def put_image(state, alias: str, configuration: resources_pb2.ImageConfiguration) -> None:
    await state.put(state.key(keys.image(alias)),
                    resources_pb2.Image(alias=alias, source_url="file:///x", configuration=configuration))


def middleware(*specs: dict, groups: tuple[str, ...] = ()) -> resources_pb2.ImageConfiguration:
    config = resources_pb2.ImageConfiguration(allowed_groups=groups)
    for spec in specs:
        config.middleware.add(name=spec["name"]).options.update(spec.get("options", {}))
    return config


async def setup(state, make_balancer, runtimes, behaviour=None, configuration=None, **overrides):
    await put_deployment(state, "d")
    if configuration is not None:
        await put_image(state, "d", configuration)
    runtime = await runtimes(behaviour or speak(["Hello", " there"]))
    await put_endpoint(state, "d", "r0", runtime.address)
    app = await make_balancer(**overrides)
    await wait_for(lambda: app.discovery.endpoints("d"), what="endpoint")
    if configuration is not None:
        await wait_for(lambda: app.discovery.image_configuration("d") == configuration, what="image")
    return app, runtime


def admin_stub(app):
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{app.grpc_port}")
    return channel, apikeys_pb2_grpc.ApiKeyServiceStub(channel)


async def create_key(app, *groups: str) -> str:
    channel, stub = admin_stub(app)
    async with channel:
        reply = await stub.CreateApiKey(apikeys_pb2.CreateApiKeyRequest(description="test", groups=groups),
                                        metadata=bearer_metadata(ADMIN), timeout=5)
    return reply.key


async def post_chat(http, app, key: str | None = None, messages=HI, stream: bool = False, headers=None):
    headers = dict(headers or {})
    if key:
        headers["Authorization"] = f"Bearer {key}"
    url = f"http://127.0.0.1:{app.http_port}/v1/chat/completions"
    resp = await http.post(url, json={"model": "d", "messages": messages, "stream": stream}, headers=headers)
    body = await resp.text()
    return resp.status, body


async def test_keys_are_created_listed_revoked_and_stored_hashed(state, make_balancer, runtimes, http):
    app, _ = await setup(state, make_balancer, runtimes, require_api_keys=True)
    channel, stub = admin_stub(app)
    async with channel:
        created = await stub.CreateApiKey(apikeys_pb2.CreateApiKeyRequest(description="ci", groups=["b", "a"]),
                                          metadata=bearer_metadata(ADMIN), timeout=5)
        key_id = created.api_key.id
        assert created.key.startswith(f"ck-{key_id}-") and list(created.api_key.groups) == ["a", "b"]
        # etcd holds the hash, never the secret.
        stored = await state.get(state.key("apikeys/" + key_id), apikeys_pb2.StoredApiKey)
        assert stored is not None and created.key.split("-", 2)[2] not in str(stored.value)
        assert len(stored.value.secret_sha256) == 64
        await wait_for(lambda: app.api_keys.cache.items.get(state.key("apikeys/" + key_id)), what="key cache")

        assert (await post_chat(http, app, created.key))[0] == 200
        assert (await post_chat(http, app))[0] == 401
        status, body = await post_chat(http, app, created.key[:-1] + ("A" if created.key[-1] != "A" else "B"))
        assert status == 401 and json.loads(body)["error"]["type"] == "authentication_error"

        listed = await stub.ListApiKeys(apikeys_pb2.ListApiKeysRequest(), metadata=bearer_metadata(ADMIN), timeout=5)
        assert [k.id for k in listed.api_keys] == [key_id]
        got = await stub.GetApiKey(apikeys_pb2.GetApiKeyRequest(id=key_id), metadata=bearer_metadata(ADMIN))
        assert got.api_key.description == "ci"

        await stub.DeleteApiKey(apikeys_pb2.DeleteApiKeyRequest(id=key_id), metadata=bearer_metadata(ADMIN))
        await wait_for(lambda: not app.api_keys.cache.items.get(state.key("apikeys/" + key_id)), what="revocation")
        assert (await post_chat(http, app, created.key))[0] == 401
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.GetApiKey(apikeys_pb2.GetApiKeyRequest(id=key_id), metadata=bearer_metadata(ADMIN))
        assert info.value.code() == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize(
    ("metadata", "code"),
    [((), grpc.StatusCode.UNAUTHENTICATED), (bearer_metadata("wrong"), grpc.StatusCode.UNAUTHENTICATED)],
)
async def test_key_management_needs_the_admin_token(state, make_balancer, runtimes, metadata, code):
    app, _ = await setup(state, make_balancer, runtimes)
    channel, stub = admin_stub(app)
    async with channel:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.CreateApiKey(apikeys_pb2.CreateApiKeyRequest(), metadata=metadata, timeout=5)
        assert info.value.code() == code
        # A user key is no admin token either.
        user_key = await create_key(app)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.ListApiKeys(apikeys_pb2.ListApiKeysRequest(), metadata=bearer_metadata(user_key), timeout=5)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_without_an_admin_token_keys_cannot_be_managed(state, make_balancer, runtimes):
    app, _ = await setup(state, make_balancer, runtimes, admin_token=None)
    channel, stub = admin_stub(app)
    async with channel:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.CreateApiKey(apikeys_pb2.CreateApiKeyRequest(), metadata=bearer_metadata("x"), timeout=5)
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION


async def test_bad_group_name_is_a_field_violation(state, make_balancer, runtimes):
    app, _ = await setup(state, make_balancer, runtimes)
    channel, stub = admin_stub(app)
    async with channel:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.CreateApiKey(apikeys_pb2.CreateApiKeyRequest(groups=["Not OK"]),
                                    metadata=bearer_metadata(ADMIN), timeout=5)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    status = rpc_status.from_call(info.value)
    assert status is not None and any("BadRequest" in d.type_url for d in status.details)


async def test_keyless_by_default_and_sdk_placeholder_keys_pass(state, make_balancer, runtimes, http):
    app, _ = await setup(state, make_balancer, runtimes)
    assert (await post_chat(http, app))[0] == 200
    assert (await post_chat(http, app, "unused"))[0] == 200  # what SDKs send when there is no key
    # A key in our format is always checked.
    assert (await post_chat(http, app, "ck-0123456789ab-" + "A" * 43))[0] == 401


async def test_group_access_control(state, make_balancer, runtimes, http):
    app, _ = await setup(state, make_balancer, runtimes, configuration=middleware(groups=("research",)))
    insider, outsider = await create_key(app, "research"), await create_key(app, "sales")
    await wait_for(lambda: len(app.api_keys.cache.items) == 2, what="keys")
    assert (await post_chat(http, app, insider))[0] == 200
    status, body = await post_chat(http, app, outsider)
    assert status == 403 and json.loads(body)["error"]["code"] == "group_not_allowed"
    assert (await post_chat(http, app))[0] == 401
    # The gRPC face applies the same rules.
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.grpc_port}") as channel:
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        request = inference_pb2.CreateChatCompletionRequest(
            model="d", messages=[runtime_pb2.ChatMessage(role="user", content="hi")])
        with pytest.raises(grpc.aio.AioRpcError) as info:
            async for _ in stub.CreateChatCompletion(request, metadata=bearer_metadata(outsider), timeout=5):
                pass
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
        chunks = [c async for c in stub.CreateChatCompletion(request, metadata=bearer_metadata(insider), timeout=5)]
        assert "".join(c.delta for c in chunks) == "Hello there"


async def test_rate_limit_per_key(state, make_balancer, runtimes, http):
    config = middleware({"name": "rate-limit", "options": {"requests_per_minute": 2}})
    app, _ = await setup(state, make_balancer, runtimes, configuration=config)
    first, second = await create_key(app), await create_key(app)
    await wait_for(lambda: len(app.api_keys.cache.items) == 2, what="keys")
    assert [(await post_chat(http, app, first))[0] for _ in range(3)] == [200, 200, 429]
    assert (await post_chat(http, app, second))[0] == 200
    url = f"http://127.0.0.1:{app.http_port}/v1/chat/completions"
    async with http.post(url, json={"model": "d", "messages": HI},
                         headers={"Authorization": f"Bearer {first}"}) as resp:
        assert resp.status == 429 and int(resp.headers["Retry-After"]) >= 1


async def test_system_prompt_and_output_blocklist_on_a_stream(state, make_balancer, runtimes, http):
    config = middleware(
        {"name": "system-prompt", "options": {"text": "Be brief."}},
        {"name": "blocklist", "options": {"patterns": ["swordfish"], "max_match_chars": 16}},
    )
    app, runtime = await setup(state, make_balancer, runtimes,
                               behaviour=speak(["The code is sw", "ord", "fi", "sh, ", "done."]), configuration=config)
    status, body = await post_chat(http, app, stream=True)
    assert status == 200
    events = [json.loads(line[6:]) for line in body.splitlines() if line.startswith("data: {")]
    pieces = [e["choices"][0]["delta"].get("content", "") for e in events if e.get("choices")]
    assert "".join(pieces) == "The code is [blocked], done."
    shown = ""
    for piece in pieces:
        shown += piece
        assert "swordfish" not in shown
    assert [m.role for m in runtime.requests[-1].chat.messages] == ["system", "user"]
    assert runtime.requests[-1].chat.messages[0].content == "Be brief."
    status, body = await post_chat(http, app, messages=[{"role": "user", "content": "say SWORDFISH"}])
    assert status == 400 and json.loads(body)["error"]["param"] == "messages[0].content"


async def test_audit_log_and_webhook(state, make_balancer, runtimes, http, tmp_path):
    received: list[dict] = []
    got = asyncio.Event()

    async def hook(request: web.Request) -> web.Response:
        received.append(await request.json())
        got.set()
        return web.json_response({})

    hook_app = web.Application()
    hook_app.router.add_post("/hook", hook)
    runner = web.AppRunner(hook_app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    audit_path = tmp_path / "audit.jsonl"
    config = middleware(
        {"name": "audit", "options": {"path": str(audit_path)}},
        {"name": "webhook", "options": {"url": f"http://127.0.0.1:{port}/hook", "timeout_s": 2}},
    )
    try:
        app, _ = await setup(state, make_balancer, runtimes, configuration=config)
        key = await create_key(app, "g")
        await wait_for(lambda: len(app.api_keys.cache.items) == 1, what="key")
        secret_message = [{"role": "user", "content": "my token is Bearer abc123secret"}]
        assert (await post_chat(http, app, key, messages=secret_message, headers={"x-request-id": "audit-1"}))[0] == 200
        await asyncio.wait_for(got.wait(), 5)
        await app.pipeline.drain()
    finally:
        await runner.cleanup()
    lines = [json.loads(line) for line in audit_path.read_text().splitlines()]
    assert len(lines) == 1
    entry = lines[0]
    assert entry["request_id"] == "audit-1" and entry["status"] == 200 and entry["model"] == "d"
    assert entry["api_key_id"] == key.split("-")[1] and entry["output"] == "Hello there"
    assert entry["completion_tokens"] == 2
    text = audit_path.read_text()
    assert "abc123secret" not in text and key not in text and "[REDACTED]" in text
    assert received[0]["request_id"] == "audit-1" and received[0]["status"] == 200
    assert received[0]["event"] == "request.finished"


async def test_webhook_to_a_dead_url_does_not_delay_or_fail_requests(state, make_balancer, runtimes, http):
    from clowder_common.processes import free_port

    config = middleware({"name": "webhook", "options": {"url": f"http://127.0.0.1:{free_port()}/x",
                                                        "timeout_s": 0.5}})
    app, _ = await setup(state, make_balancer, runtimes, configuration=config)
    assert (await post_chat(http, app))[0] == 200
    await app.pipeline.drain()
    stage = app.pipeline.chains.stages("d", config)[0]
    assert stage.failures == 1


async def test_bad_middleware_configuration_fails_closed(state, make_balancer, runtimes, http):
    app, runtime = await setup(state, make_balancer, runtimes, configuration=middleware({"name": "no-such-stage"}))
    status, body = await post_chat(http, app)
    assert status == 500 and json.loads(body)["error"]["code"] == "bad_middleware_configuration"
    assert runtime.requests == []
