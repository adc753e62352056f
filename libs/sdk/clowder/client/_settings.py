"""Where the SDK finds the cluster and its credentials: arguments, then environment, then the local cluster."""

from __future__ import annotations

import json
import os
import pathlib
from dataclasses import dataclass

from clowder_common.auth import TOKEN_ENV, read_admin_token
from clowder_common.errors import InvalidArgument
from clowder_common.security import NO_SECURITY, ClusterSecurity, SecurityConfig, load_security

API_KEY_ENV = "CLOWDER_API_KEY"
CONTROLLER_ENV = "CLOWDER_CONTROLLER"
BALANCER_ENV = "CLOWDER_BALANCER"
DATA_DIR_ENV = "CLOWDER_DATA_DIR"
# The same variables the services read for their own TLS material: on a node, one setting serves both.
TLS_CA_ENV = "CLOWDER_TLS_CA_FILE"
TLS_CERT_ENV = "CLOWDER_TLS_CERT_FILE"
TLS_KEY_ENV = "CLOWDER_TLS_KEY_FILE"
DEFAULT_CONTROLLER = "127.0.0.1:3092"
DEFAULT_BALANCER = "127.0.0.1:3091"


@dataclass(frozen=True)
class Settings:
    # gRPC address of the controller (images, deployments, nodes).
    controller: str
    # gRPC address of a balancer's InferenceService.
    balancer: str
    # Admin bearer token for the control plane; None sends none.
    admin_token: str | None
    # User API key for inference; None sends none.
    api_key: str | None
    # Deadline of one call, retries included (streams: of the whole stream).
    timeout_s: float
    # Attempts of an idempotent call that failed with UNAVAILABLE.
    max_attempts: int
    # TLS for both channels: with a CA the client verifies the servers with it; with a certificate and key it
    # also presents them (clusters that demand client certificates). Never the service credential: the SDK
    # is a user of the cluster, not one of its components.
    security: ClusterSecurity = NO_SECURITY


def data_dir() -> pathlib.Path:
    explicit = os.environ.get(DATA_DIR_ENV)
    if explicit:
        return pathlib.Path(explicit).expanduser()
    return pathlib.Path(os.environ.get("XDG_DATA_HOME") or os.path.expanduser("~/.local/share")) / "clowder"


def _local_cluster() -> dict:
    """The addresses `clowder up` recorded, if it ran here; never fatal."""
    try:
        return json.loads((data_dir() / "cluster.json").read_text())
    except (OSError, ValueError):
        return {}


def client_security(ca_file: str | None = None, cert_file: str | None = None,
                    key_file: str | None = None) -> ClusterSecurity:
    """TLS material of a cluster client, from the arguments, else the CLOWDER_TLS_* environment."""
    config = SecurityConfig(tls_ca_file=ca_file or os.environ.get(TLS_CA_ENV, ""),
                            tls_cert_file=cert_file or os.environ.get(TLS_CERT_ENV, ""),
                            tls_key_file=key_file or os.environ.get(TLS_KEY_ENV, ""))
    if config.tls_cert_file and not config.tls_ca_file:
        # Without a CA the channel would stay plaintext and the certificate would go unused: say so now.
        raise InvalidArgument(f"a client certificate needs the CA that signed the cluster's certificates "
                              f"({TLS_CA_ENV} or tls_ca_file)", field="tls_ca_file")
    # env={}: the service credential a node's environment may hold is not the SDK's to send.
    return load_security(config, env={})


def resolve(controller: str | None = None, balancer: str | None = None, admin_token: str | None = None,
            api_key: str | None = None, timeout_s: float = 30.0, max_attempts: int = 4, *,
            tls_ca_file: str | None = None, tls_cert_file: str | None = None,
            tls_key_file: str | None = None) -> Settings:
    if timeout_s <= 0:
        raise ValueError("timeout_s must be positive")
    if max_attempts < 1:
        raise ValueError("max_attempts must be at least 1")
    local = _local_cluster() if not (controller or os.environ.get(CONTROLLER_ENV)) or not (
        balancer or os.environ.get(BALANCER_ENV)) else {}
    return Settings(
        controller=controller or os.environ.get(CONTROLLER_ENV) or local.get("controller") or DEFAULT_CONTROLLER,
        balancer=balancer or os.environ.get(BALANCER_ENV) or local.get("balancer_grpc") or DEFAULT_BALANCER,
        admin_token=admin_token or read_admin_token(data_dir()),
        api_key=api_key or os.environ.get(API_KEY_ENV, "").strip() or None,
        timeout_s=timeout_s,
        max_attempts=max_attempts,
        security=client_security(tls_ca_file, tls_cert_file, tls_key_file),
    )


__all__ = ["Settings", "resolve", "client_security", "TOKEN_ENV", "API_KEY_ENV", "CONTROLLER_ENV", "BALANCER_ENV", "TLS_CA_ENV",
           "TLS_CERT_ENV", "TLS_KEY_ENV"]
