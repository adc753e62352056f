"""No way around the front door: a runtime and a storage node refuse calls without the cluster's service
credential (UNAUTHENTICATED, with details), keep health checks open, and never show the credential in argv or logs;
with TLS on, a plaintext client cannot connect."""

from __future__ import annotations

import secrets
import sys

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from clowder.runtime.v1 import runtime_pb2, runtime_pb2_grpc
from clowder.storage.v1 import storage_pb2, storage_pb2_grpc
from clowder_common.auth import bearer_metadata
from clowder_common.clients import aio_channel, sync_channel
from clowder_common.errors import from_rpc_error
from clowder_common.processes import spawn, terminate
from clowder_common.security import SERVICE_TOKEN_ENV, SERVICE_TOKEN_HEADER, ClusterSecurity, Tls
from clowder_storage.app import create_storage

from helpers.configs import storage_config
from helpers.wait import wait_for_port_file
from security_helpers import TestCA

pytestmark = pytest.mark.processes

PROMPT = runtime_pb2.GenerateRequest(prompt="The sky is", sampling=runtime_pb2.SamplingParams(temperature=0,
                                                                                              max_tokens=4))


def reason(err: grpc.RpcError) -> str:
    return from_rpc_error(err).reason


@pytest.fixture
def tls_runtime(model_path, tmp_path):
    """A `python -m clowder_runtime` process with a service credential and TLS, both given by environment and
    files (nothing secret on its command line): (port, token, CA path)."""
    ca = TestCA(tmp_path / "pki")
    server = ca.issue("runtime")
    token = secrets.token_urlsafe(32)
    port_file = tmp_path / "runtime.port"
    log_path = tmp_path / "runtime.log"
    argv = [sys.executable, "-m", "clowder_runtime", "--model-path", str(model_path), "--listen", "127.0.0.1:0",
            "--port-file", str(port_file), "--deployment", "d", "--replica-id", "r1", "--threads", "1",
            "--context-size", "512"]
    env = {SERVICE_TOKEN_ENV: token, "CLOWDER_TLS_CERT_FILE": str(server.cert),
           "CLOWDER_TLS_KEY_FILE": str(server.key), "CLOWDER_TLS_CA_FILE": str(ca.path)}
    with open(log_path, "wb") as log_file:
        proc = spawn(argv, log_file, env=env)
    try:
        port = wait_for_port_file(port_file, proc, timeout=60)
        cmdline = open(f"/proc/{proc.pid}/cmdline", "rb").read()
        assert token.encode() not in cmdline
        yield port, token, ca
    finally:
        terminate(proc, grace=10)
    assert token not in log_path.read_text(errors="replace")


def test_a_runtime_refuses_direct_calls_and_plaintext(tls_runtime):
    port, token, ca = tls_runtime
    address = f"127.0.0.1:{port}"
    with_ca = ClusterSecurity(tls=Tls(ca=ca.path.read_bytes()))

    # Plaintext against a TLS port: no connection at all.
    with sync_channel(address) as channel:
        with pytest.raises(grpc.RpcError) as caught:
            list(runtime_pb2_grpc.RuntimeServiceStub(channel).Generate(PROMPT, timeout=5))
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE

    with sync_channel(address, with_ca) as channel:
        stub = runtime_pb2_grpc.RuntimeServiceStub(channel)
        # Health stays open for probes.
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        # Over TLS but without the credential: refused, and told what is missing.
        with pytest.raises(grpc.RpcError) as caught:
            list(stub.Generate(PROMPT, timeout=10))
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert SERVICE_TOKEN_HEADER in caught.value.details()
        assert reason(caught.value) == "MISSING_SERVICE_CREDENTIAL"
        with pytest.raises(grpc.RpcError) as caught:
            stub.GetStats(runtime_pb2.GetStatsRequest(), timeout=5)
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
        # A wrong credential, or the right one as a bearer token, is no better.
        for metadata in (((SERVICE_TOKEN_HEADER, token + "x"),), bearer_metadata(token)):
            with pytest.raises(grpc.RpcError) as caught:
                list(stub.Generate(PROMPT, timeout=10, metadata=metadata))
            assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED

    # A cluster component: TLS verified against the CA, credential on every call.
    with sync_channel(address, ClusterSecurity(token, Tls(ca=ca.path.read_bytes()))) as channel:
        stub = runtime_pb2_grpc.RuntimeServiceStub(channel)
        responses = list(stub.Generate(PROMPT, timeout=30))
        assert responses[-1].usage.completion_tokens > 0
        assert stub.GetStats(runtime_pb2.GetStatsRequest(), timeout=5).requests_total == 1


async def test_storage_takes_the_service_credential_or_the_admin_token(tmp_path, etcd, etcd_prefix):
    admin, service = secrets.token_urlsafe(24), secrets.token_urlsafe(24)
    config = storage_config(etcd.endpoint, etcd_prefix, tmp_path / "store", "node-s", lease_ttl_s=5)
    app = await create_storage(config, admin, ClusterSecurity(service))
    await app.start()
    try:
        address = f"127.0.0.1:{app.port}"
        request = storage_pb2.ListBlobsRequest()
        async with aio_channel(address) as channel:
            stub = storage_pb2_grpc.StorageServiceStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.ListBlobs(request, timeout=5)
            assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert SERVICE_TOKEN_HEADER in caught.value.details()
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.ListBlobs(request, timeout=5, metadata=bearer_metadata(service))
            assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert "bearer" in caught.value.details()
            # The operator's admin token still works (clowder storage ...).
            await stub.ListBlobs(request, timeout=5, metadata=bearer_metadata(admin))
        async with aio_channel(address, ClusterSecurity(service)) as channel:
            stub = storage_pb2_grpc.StorageServiceStub(channel)
            await stub.ListBlobs(request, timeout=5)
            # Streaming calls carry it too: past the door, the blob is simply not there.
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                async for _ in stub.ReadBlob(storage_pb2.ReadBlobRequest(digest="sha256:" + "0" * 64), timeout=5):
                    pass
            assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    finally:
        await app.stop()


async def test_mutual_tls_refuses_a_client_without_a_certificate(tmp_path, etcd, etcd_prefix):
    ca = TestCA(tmp_path / "pki")
    server, client = ca.issue("storage"), ca.issue("balancer")
    stranger = TestCA(tmp_path / "other", name="stranger ca").issue("mallory")
    service = secrets.token_urlsafe(24)
    config = storage_config(etcd.endpoint, etcd_prefix, tmp_path / "store", "node-m", lease_ttl_s=5,
                            tls_cert_file=str(server.cert), tls_key_file=str(server.key), tls_ca_file=str(ca.path),
                            tls_client_auth=True, service_token_file=str(_write(tmp_path / "svc", service)))
    app = await create_storage(config, None)
    await app.start()
    try:
        address = f"127.0.0.1:{app.port}"
        request = storage_pb2.ListBlobsRequest()
        ca_pem = ca.path.read_bytes()
        refused = [ClusterSecurity(service, Tls(ca=ca_pem)),
                   ClusterSecurity(service, Tls(stranger.cert.read_bytes(), stranger.key.read_bytes(), ca_pem))]
        for security in refused:
            async with aio_channel(address, security) as channel:
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await storage_pb2_grpc.StorageServiceStub(channel).ListBlobs(request, timeout=5)
                assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        member = ClusterSecurity(service, Tls(client.cert.read_bytes(), client.key.read_bytes(), ca_pem))
        async with aio_channel(address, member) as channel:
            await storage_pb2_grpc.StorageServiceStub(channel).ListBlobs(request, timeout=5)
    finally:
        await app.stop()


def _write(path, text: str):
    path.write_text(text + "\n")
    path.chmod(0o600)
    return path
