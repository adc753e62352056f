"""hf:///ORG/REPO[@REVISION]/FILE: a Hugging Face hub file, its sha256 taken from the hub's LFS metadata."""

from __future__ import annotations

import contextlib
import os
import re
import urllib.parse
from typing import AsyncIterator

from clowder_common.errors import InvalidArgument

from clowder_storage.sources import FIELD, NO_CREDENTIAL, Credential, HttpFetcher, Opened, raise_for_status

DEFAULT_ENDPOINT = "https://huggingface.co"
_SEGMENT_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}")
_REVISION_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/-]{0,255}")
_SHA256_RE = re.compile(r'(?:W/)?"?([0-9a-f]{64})"?')


def parse_hf(url: str) -> tuple[str, str, str]:
    """(org/repo, revision, file path) of an hf:// URL; InvalidArgument when any part could escape the repo."""
    parts = urllib.parse.urlsplit(url)
    if parts.netloc or parts.query or parts.fragment:
        raise InvalidArgument("hf:// URLs look like hf:///ORG/REPO/FILE or hf:///ORG/REPO@REVISION/FILE",
                              field=FIELD)
    segments = urllib.parse.unquote(parts.path).lstrip("/").split("/")
    if len(segments) < 3:
        raise InvalidArgument("hf:// URLs need ORG/REPO/FILE", field=FIELD)
    org, repo, *path = segments
    repo, _, revision = repo.partition("@")
    revision = revision or "main"
    if (not _SEGMENT_RE.fullmatch(org) or not _SEGMENT_RE.fullmatch(repo)
            or not _REVISION_RE.fullmatch(revision) or ".." in revision.split("/")):
        raise InvalidArgument("hf:// organisation, repository or revision is malformed", field=FIELD)
    if any(not p or p in (".", "..") for p in path):
        raise InvalidArgument("hf:// file path is malformed", field=FIELD)
    return f"{org}/{repo}", revision, "/".join(path)


class HfFetcher:
    """Asks the hub where the file lives and what its sha256 is (HEAD without redirects), then reads it by HTTP."""

    schemes = ("hf",)

    def __init__(self, http: HttpFetcher, endpoint: str = "") -> None:
        self._http = http
        self.endpoint = (endpoint or os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")

    def check(self, parts: urllib.parse.SplitResult, url: str) -> None:
        parse_hf(url)

    def resolve_url(self, url: str) -> str:
        repo, revision, path = parse_hf(url)
        quote = urllib.parse.quote
        return f"{self.endpoint}/{repo}/resolve/{quote(revision, safe='')}/{quote(path)}"

    async def _locate(self, url: str, credential: Credential) -> tuple[str, str, bool]:
        """(where the bytes are, the sha256 the hub vouches for or "", whether to send the credential there)."""
        resolve = self.resolve_url(url)
        shown = f"hf:{urllib.parse.urlsplit(url).path}"
        location, digest = resolve, ""
        # A few hops at most: the hub may first redirect a renamed repo before the CDN redirect.
        for _ in range(5):
            response = await self._http.request("HEAD", location, credential=credential if
                                                _same_origin(location, self.endpoint) else NO_CREDENTIAL,
                                                allow_redirects=False)
            async with response:
                if response.status >= 400:
                    raise_for_status(response.status, shown)
                linked = response.headers.get("X-Linked-Etag", "")
                match = _SHA256_RE.fullmatch(linked.strip())
                if match and not digest:
                    digest = f"sha256:{match.group(1)}"
                if response.status in (301, 302, 303, 307, 308) and "Location" in response.headers:
                    location = urllib.parse.urljoin(location, response.headers["Location"])
                    if _same_origin(location, self.endpoint):
                        continue
                    # Off to the CDN: its signed URL is for GET, so no HEAD there.
                    break
                raise_for_status(response.status, shown)
                break
        return location, digest, _same_origin(location, self.endpoint)

    async def vouched_digest(self, url: str, credential: Credential = NO_CREDENTIAL) -> str:
        """The hub's sha256 for the file ("" for non-LFS files), without touching the CDN."""
        return (await self._locate(url, credential))[1]

    @contextlib.asynccontextmanager
    async def open(self, url: str, *, start: int = 0, end: int | None = None,
                   credential: Credential = NO_CREDENTIAL, validator: str = "") -> AsyncIterator[Opened]:
        location, digest, send = await self._locate(url, credential)
        # The CDN's signed URL carries its own authorization; the hub token must not travel there.
        async with self._http.open(location, start=start, end=end, validator=validator, digest=digest,
                                   credential=credential if send else NO_CREDENTIAL) as opened:
            yield opened


def _same_origin(a: str, b: str) -> bool:
    pa, pb = urllib.parse.urlsplit(a), urllib.parse.urlsplit(b)
    return (pa.scheme, pa.hostname, pa.port) == (pb.scheme, pb.hostname, pb.port)
