"""The SDK and the CLI reach a cluster that serves only TLS: with the cluster's CA (and a client certificate where
the controller demands one) their calls go through; plaintext, or TLS without the certificate, gets nowhere."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import uuid

import pytest

from clowder.client import Client, InvalidArgument, Unavailable
from clowder_controller.app import create_controller
from clowder_balancer.app import create_balancer

from security_helpers import TestCA
from helpers.configs import balancer_config, controller_config

TOKEN = "client-tls-admin-token"


@pytest.fixture
async def tls_cluster(etcd, tmp_path):
    """A controller that demands client certificates (mutual TLS) and a balancer that serves TLS only."""
    ca = TestCA(tmp_path / "pki")
    controller_cert, balancer_cert, client_cert = ca.issue("controller"), ca.issue("balancer"), ca.issue("client")
    prefix = f"/test-client-tls-{uuid.uuid4().hex[:8]}/"
    controller = await create_controller(controller_config(etcd.endpoint, prefix, tmp_path / "controller",
                                                           tls_cert_file=str(controller_cert.cert),
                                                           tls_key_file=str(controller_cert.key),
                                                           tls_ca_file=str(ca.path), tls_client_auth=True,
                                                           resync_interval_s=5.0), TOKEN)
    balancer = await create_balancer(balancer_config(etcd.endpoint, prefix, ready_timeout_s=5.0, drain_grace_s=1.0,
                                                     tls_cert_file=str(balancer_cert.cert),
                                                     tls_key_file=str(balancer_cert.key), tls_ca_file=str(ca.path)),
                                     admin_token=TOKEN)
    await controller.start()
    try:
        await balancer.start()
        try:
            yield (f"127.0.0.1:{controller.port}", f"127.0.0.1:{balancer.grpc_port}", ca, client_cert)
        finally:
            await balancer.stop()
    finally:
        await controller.stop()


def _client(controller: str, balancer: str, **tls) -> Client:
    # One attempt and a short deadline: a refused handshake must fail fast, not retry for the default 30 s.
    return Client(controller, balancer, admin_token=TOKEN, timeout_s=5, max_attempts=1, **tls)


@pytest.mark.processes
async def test_the_sdk_calls_a_tls_cluster_with_its_ca_and_client_certificate(tls_cluster):
    # The servers run in this test's event loop: the synchronous client runs in a thread so the loop serves it.
    await asyncio.to_thread(_sdk_calls, *tls_cluster)


def _sdk_calls(controller: str, balancer: str, ca: TestCA, cert) -> None:
    with _client(controller, balancer, tls_ca_file=str(ca.path), tls_cert_file=str(cert.cert),
                 tls_key_file=str(cert.key)) as client:
        assert list(client.images.list()) == []
        assert client.models() == []
    # The balancer does not demand a client certificate: the CA alone is enough for inference calls.
    with _client(controller, balancer, tls_ca_file=str(ca.path)) as client:
        assert client.models() == []
        # The controller does: TLS without a certificate is refused in the handshake.
        with pytest.raises(Unavailable):
            list(client.images.list())
    # Plaintext reaches neither.
    with _client(controller, balancer) as client:
        with pytest.raises(Unavailable):
            client.models()
        with pytest.raises(Unavailable):
            list(client.images.list())


@pytest.mark.unit
def test_a_client_certificate_without_a_ca_is_refused_before_any_call(tmp_path):
    cert = TestCA(tmp_path / "pki").issue("client")
    with pytest.raises(InvalidArgument) as caught:
        Client("127.0.0.1:1", "127.0.0.1:1", tls_cert_file=str(cert.cert), tls_key_file=str(cert.key))
    assert caught.value.violations[0].field == "tls_ca_file"


@pytest.mark.processes
async def test_the_cli_takes_its_tls_material_from_the_environment(tls_cluster, tmp_path):
    controller, _, ca, cert = tls_cluster
    env = {**os.environ, "CLOWDER_DATA_DIR": str(tmp_path / "cli"), "CLOWDER_ADMIN_TOKEN": TOKEN}
    for name in ("CLOWDER_TLS_CA_FILE", "CLOWDER_TLS_CERT_FILE", "CLOWDER_TLS_KEY_FILE"):
        env.pop(name, None)
    command = [sys.executable, "-m", "clowder_cli.main", "--controller", controller, "image", "ls"]

    def run(extra: dict[str, str]) -> subprocess.CompletedProcess:
        return subprocess.run(command, env={**env, **extra}, capture_output=True, text=True, timeout=60,
                              stdin=subprocess.DEVNULL)

    done = await asyncio.to_thread(run, {"CLOWDER_TLS_CA_FILE": str(ca.path), "CLOWDER_TLS_CERT_FILE": str(cert.cert),
                                         "CLOWDER_TLS_KEY_FILE": str(cert.key)})
    assert done.returncode == 0, done.stderr
    refused = await asyncio.to_thread(run, {})
    assert refused.returncode != 0
    assert "UNAVAILABLE" in refused.stderr + refused.stdout
