"""oci://REGISTRY/REPO:TAG or @sha256:...: aimages pulled from and pushed to OCI registries (distribution API)."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import ipaddress
import logging
import pathlib
import re
import time
import urllib.parse
from typing import Any, AsyncGenerator, AsyncIterator, BinaryIO

import aiohttp

from clowder_common.errors import DataLoss, InvalidArgument, PermissionDenied, Unavailable

from clowder_storage.images import MAX_MANIFEST_BYTES, MEDIA_MANIFEST, ImageIndex, LayerUpdate, Manifest
from clowder_storage.puller import Progress
from clowder_storage.sources import FIELD, NO_CREDENTIAL, Credential, HttpFetcher, Opened, raise_for_status
from clowder_storage.store import BlobStore, parse_digest

log = logging.getLogger(__name__)

# Repository paths and tags as the distribution spec defines them.
_REPO_RE = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*")
_TAG_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")
_CHALLENGE_RE = re.compile(r'(\w+)="([^"]*)"')
UPLOAD_CHUNK = 4 << 20


@dataclasses.dataclass(frozen=True)
class OciRef:
    registry: str
    repository: str
    # A tag or "sha256:<hex>".
    reference: str

    @property
    def is_digest(self) -> bool:
        return self.reference.startswith("sha256:")


def parse_oci(url: str, field: str = FIELD) -> OciRef:
    parts = urllib.parse.urlsplit(url)
    if parts.scheme != "oci" or not parts.netloc or parts.query or parts.fragment or parts.username:
        raise InvalidArgument("oci:// URLs look like oci://REGISTRY/REPO:TAG or oci://REGISTRY/REPO@sha256:<hex>",
                              field=field)
    path = parts.path.lstrip("/")
    if "@" in path:
        repository, reference = path.split("@", 1)
        parse_digest(reference, field=field)
    else:
        repository, sep, reference = path.rpartition(":")
        if not sep:
            repository, reference = path, "latest"
        if not _TAG_RE.fullmatch(reference):
            raise InvalidArgument(f"oci:// tag {reference[:80]!r} is malformed", field=field)
    if not _REPO_RE.fullmatch(repository) or len(repository) > 255:
        raise InvalidArgument(f"oci:// repository {repository[:80]!r} is malformed", field=field)
    return OciRef(parts.netloc, repository, reference)


class OciClient:
    """Distribution API with bearer-token auth (401 challenge -> realm token) or Basic; also the oci:// blob fetcher.

    It reads manifests and pushes stored images; an image pull (manifest, then blobs through the puller) is
    ImagePuller.pull_oci, so this client needs nothing built after the puller.

    A PullBlob of oci://REGISTRY/REPO@sha256:<hex> reads that blob of the repository, resumable by range.
    """

    schemes = ("oci",)

    def __init__(self, http: HttpFetcher, store: BlobStore, index: ImageIndex,
                 insecure_registries: tuple[str, ...] = ()) -> None:
        self._http = http
        self._store = store
        # Push reads the manifest an image name stands for; pulling an image is image_pulls.py's.
        self._index = index
        self._insecure = set(insecure_registries)
        # (registry, scope, credential identity) -> (token, expiry)
        self._tokens: dict[tuple[str, str, int], tuple[str, float]] = {}

    def check(self, parts: urllib.parse.SplitResult, url: str) -> None:
        if not parse_oci(url).is_digest:
            raise InvalidArgument("a blob pull needs oci://REGISTRY/REPO@sha256:<hex>", field=FIELD)

    def _base(self, registry: str) -> str:
        host = registry.rsplit(":", 1)[0].strip("[]")
        loopback = host == "localhost"
        with contextlib.suppress(ValueError):
            loopback = loopback or ipaddress.ip_address(host).is_loopback
        # Plain HTTP only where it cannot cross a network: loopback, or registries the operator listed.
        return f"{'http' if loopback or registry in self._insecure else 'https'}://{registry}"

    # -- auth ------------------------------------------------------------------------------

    async def _token(self, registry: str, challenge: str, credential: Credential) -> str:
        params = dict(_CHALLENGE_RE.findall(challenge))
        realm = params.pop("realm", "")
        if not realm.startswith(("https://", "http://")):
            raise PermissionDenied(f"registry {registry} sent a token challenge without a usable realm",
                                   reason="REGISTRY_AUTH")
        key = (registry, params.get("scope", ""), hash(credential))
        cached = self._tokens.get(key)
        if cached and cached[1] > time.monotonic():
            return cached[0]
        query = urllib.parse.urlencode({k: v for k, v in params.items() if k in ("service", "scope")})
        basic = Credential(username=credential.username, password=credential.password) if credential.username \
            else NO_CREDENTIAL
        response = await self._http.request("GET", f"{realm}?{query}", credential=basic)
        async with response:
            raise_for_status(response.status, f"token service of {registry}")
            body = await response.json(content_type=None)
        token = body.get("token") or body.get("access_token") if isinstance(body, dict) else None
        if not token:
            raise PermissionDenied(f"token service of {registry} returned no token", reason="REGISTRY_AUTH")
        ttl = float(body.get("expires_in", 60))
        self._tokens[key] = (token, time.monotonic() + max(ttl - 10, 5))
        return token

    async def _send(self, method: str, registry: str, url: str, credential: Credential, *,
                    headers: dict[str, str] | None = None, data: Any = None,
                    allow_redirects: bool = True) -> aiohttp.ClientResponse:
        """One request, answering a 401 challenge once (bearer token from the realm, or Basic)."""
        return (await self._send_auth(method, registry, url, credential, headers=headers, data=data,
                                      allow_redirects=allow_redirects))[0]

    async def _send_auth(self, method: str, registry: str, url: str, credential: Credential, *,
                         headers: dict[str, str] | None = None, data: Any = None,
                         allow_redirects: bool = True) -> tuple[aiohttp.ClientResponse, Credential]:
        auth = NO_CREDENTIAL
        cached = [t for (r, _, c), (t, e) in self._tokens.items()
                  if r == registry and c == hash(credential) and e > time.monotonic()]
        if cached:
            auth = Credential(bearer_token=cached[-1])
        for attempt in range(2):
            body = data() if callable(data) else data
            response = await self._http.request(method, url, headers=headers, credential=auth, data=body,
                                                allow_redirects=allow_redirects)
            if response.status != 401 or attempt:
                return response, auth
            challenge = response.headers.get("WWW-Authenticate", "")
            response.release()
            if challenge.lower().startswith("bearer"):
                auth = Credential(bearer_token=await self._token(registry, challenge, credential))
            elif credential:
                auth = credential
            else:
                break
        return response, auth

    # -- blobs as a source ------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def open(self, url: str, *, start: int = 0, end: int | None = None,
                   credential: Credential = NO_CREDENTIAL, validator: str = "") -> AsyncIterator[Opened]:
        ref = parse_oci(url)
        blob_url = f"{self._base(ref.registry)}/v2/{ref.repository}/blobs/{ref.reference}"
        # HEAD answers the auth challenge; the GET then carries what worked (dropped if redirected elsewhere).
        response, auth = await self._send_auth("HEAD", ref.registry, blob_url, credential, allow_redirects=False)
        async with response:
            if response.status < 300 or response.status >= 400:
                raise_for_status(response.status, url)
        async with self._http.open(blob_url, start=start, end=end, credential=auth, validator=validator,
                                   digest=ref.reference) as opened:
            yield opened

    # -- images ---------------------------------------------------------------------------------

    async def fetch_manifest(self, ref: OciRef, credential: Credential) -> tuple[str, bytes]:
        url = f"{self._base(ref.registry)}/v2/{ref.repository}/manifests/{ref.reference}"
        response = await self._send("GET", ref.registry, url, credential, headers={"Accept": MEDIA_MANIFEST})
        async with response:
            raise_for_status(response.status, f"oci://{ref.registry}/{ref.repository}")
            data = await response.content.read(MAX_MANIFEST_BYTES + 1)
        if len(data) > MAX_MANIFEST_BYTES:
            raise InvalidArgument("the registry's manifest is larger than 4 MiB", field="source_url")
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        if ref.is_digest and digest != ref.reference:
            raise DataLoss(f"registry manifest does not match {ref.reference}: got {digest}",
                           metadata={"expected_digest": ref.reference, "actual_digest": digest})
        return digest, data

    async def push(self, name: str, url: str, credential: Credential) -> AsyncGenerator[LayerUpdate | str, None]:
        ref = parse_oci(url, field="target_url")
        if ref.is_digest:
            raise InvalidArgument("push to a tag: oci://REGISTRY/REPO:TAG", field="target_url")
        manifest_digest, data = await self._index.manifest_bytes(name)
        manifest = Manifest.parse(data)
        base = f"{self._base(ref.registry)}/v2/{ref.repository}"
        for index, desc in [(-1, manifest.config), *enumerate(manifest.layers)]:
            head = await self._send("HEAD", ref.registry, f"{base}/blobs/{desc.digest}", credential)
            head.release()
            if head.status == 200:
                yield LayerUpdate(index, desc.digest, Progress(desc.size, desc.size, 0.0, 0.0))
                continue
            started = await self._send("POST", ref.registry, f"{base}/blobs/uploads/", credential)
            async with started:
                raise_for_status(started.status, f"oci://{ref.registry}/{ref.repository}")
                location = started.headers.get("Location", "")
            if not location:
                raise Unavailable(f"registry {ref.registry} gave no upload location", reason="REGISTRY_PROTOCOL")
            upload = urllib.parse.urljoin(f"{base}/blobs/uploads/", location)
            sep = "&" if "?" in upload else "?"
            sent = [0]
            path = self._store.path_of(desc.digest)
            put = await self._send(
                "PUT", ref.registry, f"{upload}{sep}digest={desc.digest}", credential,
                headers={"Content-Type": "application/octet-stream", "Content-Length": str(desc.size)},
                # Bound now: the request retries (a 401 challenge) call it again, always within this layer.
                data=lambda path=path, sent=sent: self._read_file(path, sent))
            async with put:
                raise_for_status(put.status, f"oci://{ref.registry}/{ref.repository}")
            yield LayerUpdate(index, desc.digest, Progress(desc.size, desc.size, 0.0, 0.0))
        put = await self._send("PUT", ref.registry, f"{base}/manifests/{ref.reference}", credential,
                               headers={"Content-Type": MEDIA_MANIFEST}, data=data)
        async with put:
            raise_for_status(put.status, f"oci://{ref.registry}/{ref.repository}")
            echoed = put.headers.get("Docker-Content-Digest", manifest_digest)
        if echoed != manifest_digest:
            raise DataLoss(f"registry stored manifest {echoed}, not {manifest_digest}")
        log.info("pushed %s to oci://%s/%s:%s", name, ref.registry, ref.repository, ref.reference)
        yield manifest_digest

    async def _read_file(self, path: pathlib.Path, sent: list[int]) -> AsyncGenerator[bytes, None]:
        handle: BinaryIO = await self._store.run(open, path, "rb")
        try:
            while chunk := await self._store.run(handle.read, UPLOAD_CHUNK):
                sent[0] += len(chunk)
                yield chunk
        finally:
            await self._store.run(handle.close)
