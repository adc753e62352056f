"""etcd with TLS client certificates: a real etcd started with TLS flags, reached only with the CA and a client
certificate; a storage process configured with them registers its node there."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time

import pytest

from clowder.controller.v1 import resources_pb2
from clowder_common import keys
from clowder_common.auth import TOKEN_ENV
from clowder_common.errors import Unavailable
from clowder_common.etcd import EtcdState
from clowder_common.etcd_server import _member_argv, _spawn, _wait_port
from clowder_common.processes import free_port, terminate
from clowder_common.security import Tls

from security_helpers import TestCA

pytestmark = pytest.mark.processes

PREFIX = "/tls/"


@pytest.fixture(scope="module")
def tls_etcd(tmp_path_factory):
    """etcd serving clients over https only, demanding client certificates its CA signed."""
    base = tmp_path_factory.mktemp("etcd-tls")
    ca = TestCA(base / "pki")
    server, client = ca.issue("etcd"), ca.issue("clowder-component")
    client_port, peer_port = free_port(), free_port()
    argv = _member_argv("tls", base / "data", client_port, peer_port, f"tls=http://127.0.0.1:{peer_port}", "tls")
    url = f"https://127.0.0.1:{client_port}"
    argv[argv.index("--listen-client-urls") + 1] = url
    argv[argv.index("--advertise-client-urls") + 1] = url
    argv += ["--cert-file", str(server.cert), "--key-file", str(server.key), "--trusted-ca-file", str(ca.path),
             "--client-cert-auth"]
    log_path = base / "etcd.log"
    proc = _spawn(argv, log_path)
    try:
        _wait_port(proc, client_port, 20, log_path)
        yield f"127.0.0.1:{client_port}", ca, client
    finally:
        terminate(proc, grace=5)


async def test_etcd_is_reached_only_with_the_ca_and_a_client_certificate(tls_etcd):
    endpoint, ca, client = tls_etcd
    good = Tls(client.cert.read_bytes(), client.key.read_bytes(), ca.path.read_bytes())
    state = EtcdState([endpoint], PREFIX, good)
    await state.connect()
    try:
        await state.put(state.key("nodes", "x"), resources_pb2.Node(name="x"))
        got = await state.get(state.key("nodes", "x"), resources_pb2.Node)
        assert got is not None and got.value.name == "x"
    finally:
        await state.close()
    # Plaintext, and TLS without a client certificate: both turned away.
    for tls in (None, Tls(ca=ca.path.read_bytes())):
        with pytest.raises(Unavailable):
            await EtcdState([endpoint], PREFIX, tls).connect()


async def test_a_storage_process_registers_in_etcd_over_tls(tls_etcd, tmp_path):
    endpoint, ca, client = tls_etcd
    port = free_port()
    env = {**os.environ, TOKEN_ENV: "admin-token-for-this-test", "CLOWDER_ETCD_CA_FILE": str(ca.path),
           "CLOWDER_ETCD_CERT_FILE": str(client.cert), "CLOWDER_ETCD_KEY_FILE": str(client.key)}
    log_path = tmp_path / "storage.log"
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "clowder_storage", "--listen", f"127.0.0.1:{port}", "--data-dir",
             str(tmp_path / "store"), "--node-name", "tls-node", "--etcd-endpoints", endpoint, "--etcd-prefix",
             PREFIX, "--lease-ttl-s", "5"], stdout=log_file, stderr=subprocess.STDOUT, env=env)
    state = EtcdState([endpoint], PREFIX, Tls(client.cert.read_bytes(), client.key.read_bytes(),
                                               ca.path.read_bytes()))
    await state.connect()
    try:
        deadline = time.monotonic() + 30
        node = None
        while node is None and time.monotonic() < deadline:
            assert proc.poll() is None, log_path.read_text()
            node = await state.get(state.key(keys.node("tls-node")), resources_pb2.Node)
            await asyncio.sleep(0.2)
        assert node is not None, log_path.read_text()
        assert node.value.storage_address == f"127.0.0.1:{port}"
    finally:
        await state.close()
        terminate(proc, grace=10)
