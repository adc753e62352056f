"""The cluster's service credential and TLS settings: what runtimes and storage demand, and what components send.

The service credential is a per-cluster secret every component gets by file or environment (never by a
command-line flag, which `ps` would show). Runtimes and storage refuse calls that lack it, so nobody who merely
reaches their ports skips the balancer's keys, limits and audit, or the controller's admin token.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import ssl
import tempfile
from typing import Mapping

import grpc

from clowder_common.auth import ensure_secret
from clowder_common.errors import InvalidArgument

SERVICE_TOKEN_ENV = "CLOWDER_SERVICE_TOKEN"
SERVICE_TOKEN_FILE = "service-token"
# A header of its own, apart from `authorization`, which already carries the admin token on storage calls.
SERVICE_TOKEN_HEADER = "x-clowder-service-token"


@dataclasses.dataclass(frozen=True)
class SecurityConfig:
    """Fields every service's config carries (YAML, CLOWDER_<FIELD>, or the chart's Secrets as files)."""

    # File holding the cluster's service credential (CLOWDER_SERVICE_TOKEN wins when set). Runtimes and
    # storage refuse calls without it once they have one; the other components send it to them.
    service_token_file: str = ""
    # This service's certificate and key (PEM): with both, it serves gRPC over TLS only, and presents them as
    # its client certificate when calling other components (mutual TLS).
    tls_cert_file: str = ""
    tls_key_file: str = ""
    # CA bundle (PEM) that signed the cluster's certificates: with it, calls to other components use TLS and
    # verify them; a TLS server also demands client certificates it signed when tls_client_auth is set.
    tls_ca_file: str = ""
    tls_client_auth: bool = False
    # etcd over TLS: the CA that signed etcd's certificate, and this component's client certificate and key.
    etcd_ca_file: str = ""
    etcd_cert_file: str = ""
    etcd_key_file: str = ""


@dataclasses.dataclass(frozen=True)
class Tls:
    """PEM bytes read once at start; empty when a part is not configured."""

    cert: bytes = b""
    key: bytes = b""
    ca: bytes = b""
    client_auth: bool = False

    def __repr__(self) -> str:
        # The key never reaches a log line or a traceback.
        return f"Tls(cert={bool(self.cert)}, key=<redacted>, ca={bool(self.ca)}, client_auth={self.client_auth})"

    def server_credentials(self) -> grpc.ServerCredentials | None:
        if not (self.cert and self.key):
            return None
        return grpc.ssl_server_credentials([(self.key, self.cert)], root_certificates=self.ca or None,
                                           require_client_auth=self.client_auth)

    def ssl_context(self) -> ssl.SSLContext | None:
        """For an HTTP server (the balancer's OpenAI API): TLS with our certificate, None without one."""
        if not (self.cert and self.key):
            return None
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        # The ssl module loads certificates from files only: a private temporary directory, gone at once.
        with tempfile.TemporaryDirectory() as directory:
            cert, key = pathlib.Path(directory) / "cert.pem", pathlib.Path(directory) / "key.pem"
            cert.write_bytes(self.cert)
            key.touch(0o600)
            key.write_bytes(self.key)
            context.load_cert_chain(cert, key)
        return context

    def channel_credentials(self) -> grpc.ChannelCredentials | None:
        if not self.ca:
            return None
        # Our certificate doubles as the client certificate, so a server that demands one gets it.
        return grpc.ssl_channel_credentials(root_certificates=self.ca, private_key=self.key or None,
                                            certificate_chain=self.cert or None)


@dataclasses.dataclass(frozen=True)
class ClusterSecurity:
    """What one component knows: the service credential (None: not configured) and its TLS material."""

    service_token: str | None = None
    tls: Tls = Tls()
    # etcd's own TLS material (CA, client certificate, key).
    etcd_tls: Tls = Tls()

    def __repr__(self) -> str:
        return f"ClusterSecurity(service_token={'<set>' if self.service_token else None}, tls={self.tls!r})"

    def metadata(self) -> tuple[tuple[str, str], ...]:
        """Call metadata that identifies a cluster component."""
        return ((SERVICE_TOKEN_HEADER, self.service_token),) if self.service_token else ()


NO_SECURITY = ClusterSecurity()


def _read(path: str, field: str) -> bytes:
    if not path:
        return b""
    try:
        return pathlib.Path(path).expanduser().read_bytes()
    except OSError as exc:
        raise InvalidArgument(f"config {field}: cannot read {path}: {exc.strerror}", field=field) from None


def load_security(config: SecurityConfig, env: Mapping[str, str] | None = None) -> ClusterSecurity:
    """Read the credential (environment, else file) and the PEM files named in `config`."""
    env = os.environ if env is None else env
    token = env.get(SERVICE_TOKEN_ENV, "").strip()
    if not token and config.service_token_file:
        token = _read(config.service_token_file, "service_token_file").decode().strip()
        if not token:
            raise InvalidArgument(f"config service_token_file: {config.service_token_file} is empty",
                                  field="service_token_file")
    if bool(config.tls_cert_file) != bool(config.tls_key_file):
        raise InvalidArgument("config tls_cert_file and tls_key_file go together", field="tls_cert_file")
    if config.tls_client_auth and not (config.tls_ca_file and config.tls_cert_file):
        raise InvalidArgument("config tls_client_auth needs tls_ca_file, tls_cert_file and tls_key_file",
                              field="tls_client_auth")
    if bool(config.etcd_cert_file) != bool(config.etcd_key_file):
        raise InvalidArgument("config etcd_cert_file and etcd_key_file go together", field="etcd_cert_file")
    tls = Tls(_read(config.tls_cert_file, "tls_cert_file"), _read(config.tls_key_file, "tls_key_file"),
              _read(config.tls_ca_file, "tls_ca_file"), config.tls_client_auth)
    etcd_tls = Tls(_read(config.etcd_cert_file, "etcd_cert_file"), _read(config.etcd_key_file, "etcd_key_file"),
                   _read(config.etcd_ca_file, "etcd_ca_file"))
    if (etcd_tls.cert or etcd_tls.key) and not etcd_tls.ca:
        raise InvalidArgument("config etcd_cert_file needs etcd_ca_file", field="etcd_ca_file")
    return ClusterSecurity(token or None, tls, etcd_tls)


def service_token_path(data_dir: str | os.PathLike[str]) -> pathlib.Path:
    return pathlib.Path(data_dir) / SERVICE_TOKEN_FILE


def ensure_service_token(data_dir: str | os.PathLike[str]) -> str:
    """The cluster's service credential: the environment's, else the stored one, else a new one stored 0600."""
    return ensure_secret(SERVICE_TOKEN_ENV, service_token_path(data_dir))


def _with_metadata(details: grpc.aio.ClientCallDetails,
                   metadata: tuple[tuple[str, str], ...]) -> grpc.aio.ClientCallDetails:
    merged = grpc.aio.Metadata(*(details.metadata or ()), *metadata)
    return grpc.aio.ClientCallDetails(details.method, details.timeout, merged, details.credentials,
                                      details.wait_for_ready)


# One class per call kind: grpc.aio files an interceptor under the first kind it is an instance of only.
class _UnaryUnary(grpc.aio.UnaryUnaryClientInterceptor):
    def __init__(self, metadata: tuple[tuple[str, str], ...]) -> None:
        self._metadata = metadata

    async def intercept_unary_unary(self, continuation, client_call_details, request):
        return await continuation(_with_metadata(client_call_details, self._metadata), request)


class _UnaryStream(grpc.aio.UnaryStreamClientInterceptor):
    def __init__(self, metadata: tuple[tuple[str, str], ...]) -> None:
        self._metadata = metadata

    async def intercept_unary_stream(self, continuation, client_call_details, request):
        return await continuation(_with_metadata(client_call_details, self._metadata), request)


class _StreamUnary(grpc.aio.StreamUnaryClientInterceptor):
    def __init__(self, metadata: tuple[tuple[str, str], ...]) -> None:
        self._metadata = metadata

    async def intercept_stream_unary(self, continuation, client_call_details, request_iterator):
        return await continuation(_with_metadata(client_call_details, self._metadata), request_iterator)


class _StreamStream(grpc.aio.StreamStreamClientInterceptor):
    def __init__(self, metadata: tuple[tuple[str, str], ...]) -> None:
        self._metadata = metadata

    async def intercept_stream_stream(self, continuation, client_call_details, request_iterator):
        return await continuation(_with_metadata(client_call_details, self._metadata), request_iterator)


def client_interceptors(security: ClusterSecurity) -> list[grpc.aio.ClientInterceptor]:
    """Interceptors that add the service credential to every call of every kind on an aio channel."""
    metadata = security.metadata()
    if not metadata:
        return []
    return [_UnaryUnary(metadata), _UnaryStream(metadata), _StreamUnary(metadata), _StreamStream(metadata)]


def child_environment(config: SecurityConfig, security: ClusterSecurity) -> dict[str, str]:
    """Environment that makes a child process (a runtime the controller starts on this machine) a cluster
    component like its parent: the credential itself, and the paths of the same TLS and etcd PEM files."""
    env = {SERVICE_TOKEN_ENV: security.service_token} if security.service_token else {}
    for field in ("tls_cert_file", "tls_key_file", "tls_ca_file", "etcd_ca_file", "etcd_cert_file",
                  "etcd_key_file"):
        path = getattr(config, field)
        if path:
            env[f"CLOWDER_{field.upper()}"] = os.path.abspath(os.path.expanduser(path))
    if config.tls_client_auth:
        env["CLOWDER_TLS_CLIENT_AUTH"] = "true"
    return env
