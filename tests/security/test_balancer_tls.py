"""The whole front door over TLS: a balancer serving HTTPS and gRPC over TLS, calling a runtime process that
demands TLS and the service credential; plaintext clients get nowhere, the balancer's calls go through."""

from __future__ import annotations

import asyncio
import secrets
import ssl
import sys
import time
import uuid

import grpc
import httpx
import pytest

from clowder.balancer.v1 import inference_pb2, inference_pb2_grpc
from clowder.controller.v1 import resources_pb2
from clowder.runtime.v1 import runtime_pb2
from clowder_common import keys
from clowder_common.clients import aio_channel
from clowder_common.etcd import EtcdState
from clowder_common.processes import spawn, terminate
from clowder_common.security import SERVICE_TOKEN_ENV, ClusterSecurity, Tls
from clowder_balancer.app import create_balancer

from security_helpers import TestCA
from helpers.configs import balancer_config

pytestmark = pytest.mark.processes

DEPLOYMENT = "tls-d"


async def test_balancer_serves_tls_and_calls_a_tls_runtime_with_the_credential(etcd, model_path, tmp_path):
    ca = TestCA(tmp_path / "pki")
    runtime_cert, balancer_cert = ca.issue("runtime"), ca.issue("balancer")
    token = secrets.token_urlsafe(32)
    token_file = tmp_path / "service-token"
    token_file.write_text(token + "\n")
    token_file.chmod(0o600)
    prefix = f"/test-tls-{uuid.uuid4().hex[:8]}/"
    state = EtcdState([etcd.endpoint], prefix)
    await state.connect()
    await state.put(state.key(keys.deployment(DEPLOYMENT)),
                    resources_pb2.Deployment(name=DEPLOYMENT, image=DEPLOYMENT, replicas=1))
    log_path = tmp_path / "runtime.log"
    with open(log_path, "wb") as log_file:
        proc = spawn([sys.executable, "-m", "clowder_runtime", "--model-path", str(model_path), "--listen",
                      "127.0.0.1:0", "--deployment", DEPLOYMENT, "--replica-id", "r1", "--etcd-endpoints",
                      etcd.endpoint, "--etcd-prefix", prefix, "--threads", "1", "--context-size", "512"],
                     log_file, env={SERVICE_TOKEN_ENV: token, "CLOWDER_TLS_CERT_FILE": str(runtime_cert.cert),
                                    "CLOWDER_TLS_KEY_FILE": str(runtime_cert.key),
                                    "CLOWDER_TLS_CA_FILE": str(ca.path)})
    app = None
    try:
        deadline = time.monotonic() + 60
        while await state.get(state.key(keys.endpoint(DEPLOYMENT, "r1")), runtime_pb2.Endpoint) is None:
            assert proc.poll() is None and time.monotonic() < deadline, log_path.read_text()
            await asyncio.sleep(0.1)
        config = balancer_config(etcd.endpoint, prefix, ready_timeout_s=10.0, tls_cert_file=str(balancer_cert.cert),
                                 tls_key_file=str(balancer_cert.key), tls_ca_file=str(ca.path),
                                 service_token_file=str(token_file))
        app = await create_balancer(config)
        await app.start()
        body = {"model": DEPLOYMENT, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
        verify = ssl.create_default_context(cafile=str(ca.path))
        async with httpx.AsyncClient(verify=verify, timeout=60) as client:
            reply = await client.post(f"https://127.0.0.1:{app.http_port}/v1/chat/completions", json=body)
            assert reply.status_code == 200, reply.text
            assert reply.json()["usage"]["completion_tokens"] > 0
        async with httpx.AsyncClient(timeout=10) as client:
            with pytest.raises(httpx.HTTPError):
                await client.post(f"http://127.0.0.1:{app.http_port}/v1/chat/completions", json=body)
        # gRPC: plaintext cannot connect; over TLS the inference API answers (user calls need no credential).
        request = inference_pb2.ListModelsRequest()
        async with aio_channel(f"127.0.0.1:{app.grpc_port}") as channel:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await inference_pb2_grpc.InferenceServiceStub(channel).ListModels(request, timeout=5)
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        with_ca = ClusterSecurity(tls=Tls(ca=ca.path.read_bytes()))
        async with aio_channel(f"127.0.0.1:{app.grpc_port}", with_ca) as channel:
            listed = await inference_pb2_grpc.InferenceServiceStub(channel).ListModels(request, timeout=10)
            assert [m.id for m in listed.models] == [DEPLOYMENT]
    finally:
        if app is not None:
            await app.stop()
        terminate(proc, grace=10)
        await state.delete_prefix(prefix)
        await state.close()
