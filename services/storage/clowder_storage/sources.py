"""Where blobs come from: one fetcher per URL scheme behind a small interface that can read byte ranges."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import os
import re
import urllib.parse
from typing import IO, Any, AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterable, Mapping, Protocol

import aiohttp

from clowder_common.errors import InvalidArgument, NotFound, PermissionDenied, Unavailable

# Large reads keep per-chunk overhead (executor hops, Python calls) small next to hashing and writing.
CHUNK_BYTES = 4 << 20
FIELD = "source_url"
_CONTENT_RANGE_RE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")


def redact_url(url: str) -> str:
    """The URL as it may appear in messages and logs: no user:password, query or fragment."""
    try:
        parts = urllib.parse.urlsplit(url)
        host = parts.hostname or ""
        if ":" in host:
            host = f"[{host}]"
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        return "<malformed URL>"
    query = "?<redacted>" if parts.query else ""
    return f"{parts.scheme}://{host}{port}{parts.path}{query}"


def parse_url(url: str, field: str = FIELD) -> urllib.parse.SplitResult:
    if not url:
        raise InvalidArgument(f"{field} is required", field=field)
    if len(url) > 8192 or any(c in url for c in "\r\n\0"):
        raise InvalidArgument(f"{field} is malformed", field=field)
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        raise InvalidArgument(f"{field} {redact_url(url)} is malformed", field=field) from None
    return parts


@dataclasses.dataclass(frozen=True)
class Credential:
    """Secrets for one call. Never logged: repr shows only which parts are set."""

    bearer_token: str = ""
    username: str = ""
    password: str = ""

    def __bool__(self) -> bool:
        return bool(self.bearer_token or self.username)

    def __repr__(self) -> str:
        kind = "bearer" if self.bearer_token else "basic" if self.username else "none"
        return f"Credential(<{kind}, redacted>)"

    __str__ = __repr__

    def authorization(self) -> str | None:
        """The HTTP Authorization header value, or None."""
        if self.bearer_token:
            return f"Bearer {self.bearer_token}"
        if self.username:
            raw = f"{self.username}:{self.password}".encode()
            return "Basic " + base64.b64encode(raw).decode()
        return None


NO_CREDENTIAL = Credential()


def resolve_secret_ref(ref: str, field: str = "credentials.secret_ref") -> str:
    """The secret named by "env:NAME" or "file:/path" on this node; the value is never echoed in errors."""
    kind, sep, name = ref.partition(":")
    if not sep or not name or kind not in ("env", "file"):
        raise InvalidArgument("secret_ref must be 'env:NAME' or 'file:/absolute/path'", field=field)
    if kind == "env":
        value = os.environ.get(name)
        if value is None:
            raise InvalidArgument(f"secret_ref names environment variable {name}, which is not set", field=field)
        return value.strip()
    if not name.startswith("/"):
        raise InvalidArgument("secret_ref file path must be absolute", field=field)
    try:
        with open(name, encoding="utf-8") as handle:
            return handle.read(65536).strip()
    except OSError as exc:
        raise InvalidArgument(f"secret_ref file {name} cannot be read: {exc.strerror}", field=field) from None


@dataclasses.dataclass
class Opened:
    """An open source read from `start`: its bytes and what the source said about the whole resource."""

    chunks: AsyncGenerator[bytes, None]
    # Bytes this read will deliver; None when the source does not say.
    size: int | None
    # Size of the whole resource; None when unknown.
    total: int | None
    # Offset of the first delivered byte: 0 when the source ignored a range (the reader must restart).
    start: int = 0
    # The source serves byte ranges, so a broken read can resume and large ones can be split.
    ranges: bool = False
    # Identifies this version of the resource (ETag, mtime); a resumed read sends it to detect a change.
    validator: str = ""
    # "sha256:<hex>" the source vouches for (hub LFS metadata, registry digest); verified, never trusted.
    digest: str = ""


class Fetcher(Protocol):
    """Reads one kind of source. `check` runs before anything is downloaded, so a bad URL fails fast."""

    @property
    def schemes(self) -> tuple[str, ...]:
        """URL schemes it reads (a class attribute in every fetcher)."""
        ...

    def check(self, parts: urllib.parse.SplitResult, url: str) -> None: ...

    def open(self, url: str, *, start: int = 0, end: int | None = None, credential: Credential = NO_CREDENTIAL,
             validator: str = "") -> contextlib.AbstractAsyncContextManager[Opened]:
        """Bytes [start, end) of the source (end None: to the end)."""
        ...


class FileFetcher:
    """file:///absolute/path, read in the I/O executor."""

    schemes = ("file",)

    def __init__(self, run: Callable[..., Awaitable[Any]], roots: tuple[str, ...] = ()) -> None:
        # `run(fn, *args)` executes blocking work off the event loop (the store's bounded executor).
        self._run = run
        # Directories sources must lie in, symlinks resolved; empty: any path this process can read.
        self._roots = tuple(os.path.realpath(os.path.expanduser(root)) for root in roots)

    def check(self, parts: urllib.parse.SplitResult, url: str) -> None:
        if parts.netloc not in ("", "localhost"):
            raise InvalidArgument(f"source_url {redact_url(url)}: file:// URLs name a local path, not a host",
                                  field=FIELD)
        if not parts.path.startswith("/") or parts.query or parts.fragment:
            raise InvalidArgument(f"source_url {redact_url(url)}: expected file:///absolute/path", field=FIELD)

    @staticmethod
    def _path(url: str) -> str:
        return urllib.parse.unquote(urllib.parse.urlsplit(url).path)

    def _confined(self, path: str) -> str:
        """The path to open: with roots configured, the resolved path, which must lie inside one of them
        (a symlink or '..' pointing out of a root is refused like any other outside path)."""
        if not self._roots:
            return path
        resolved = os.path.realpath(path)
        if not any(os.path.commonpath([resolved, root]) == root for root in self._roots):
            raise PermissionDenied(f"source file://{path} is outside the directories this node serves files from "
                                   f"({', '.join(self._roots)})", reason="SOURCE_OUTSIDE_FILE_ROOTS")
        return resolved

    def _open_sync(self, path: str) -> tuple[IO[bytes], os.stat_result]:
        path = self._confined(path)
        try:
            handle = open(path, "rb", buffering=0)  # noqa: SIM115 - closed by the caller
        except FileNotFoundError:
            raise NotFound(f"source file://{path} does not exist", reason="SOURCE_NOT_FOUND") from None
        except PermissionError:
            raise PermissionDenied(f"source file://{path} is not readable", reason="SOURCE_FORBIDDEN") from None
        except IsADirectoryError:
            raise InvalidArgument(f"source file://{path} is a directory", field=FIELD) from None
        except OSError as exc:
            raise Unavailable(f"cannot open source file://{path}: {exc.strerror}") from None
        return handle, os.fstat(handle.fileno())

    @contextlib.asynccontextmanager
    async def open(self, url: str, *, start: int = 0, end: int | None = None,
                   credential: Credential = NO_CREDENTIAL, validator: str = "") -> AsyncIterator[Opened]:
        path = self._path(url)
        handle, st = await self._run(self._open_sync, path)
        try:
            current = f"{st.st_mtime_ns}-{st.st_size}"
            if validator and validator != current:
                start, end = 0, None  # the file changed since the first read: start over
            stop = st.st_size if end is None else min(end, st.st_size)
            yield Opened(self._chunks(handle, path, start, stop), max(stop - start, 0), st.st_size,
                         start=start, ranges=True, validator=current)
        finally:
            await self._run(handle.close)

    async def _chunks(self, handle: IO[bytes], path: str, start: int, stop: int) -> AsyncGenerator[bytes, None]:
        offset = start
        while offset < stop:
            try:
                chunk = await self._run(os.pread, handle.fileno(), min(CHUNK_BYTES, stop - offset), offset)
            except OSError as exc:
                raise Unavailable(f"reading source file://{path} failed: {exc.strerror}") from None
            if not chunk:
                return
            offset += len(chunk)
            yield chunk


class HttpFetcher:
    """http:// and https:// through one shared aiohttp session, with ranges, credentials and timeouts."""

    schemes = ("http", "https")

    def __init__(self, connect_timeout_s: float, read_timeout_s: float, total_timeout_s: float) -> None:
        self._timeout = aiohttp.ClientTimeout(
            total=total_timeout_s, sock_connect=connect_timeout_s, sock_read=read_timeout_s
        )
        self._session: aiohttp.ClientSession | None = None

    def check(self, parts: urllib.parse.SplitResult, url: str) -> None:
        if not parts.hostname:
            raise InvalidArgument(f"source_url {redact_url(url)}: no host", field=FIELD)

    def client(self) -> aiohttp.ClientSession:
        # Created lazily inside the running loop; aiohttp sessions are bound to one loop.
        if self._session is None or self._session.closed:
            # Digests cover the bytes as published: ask for them unencoded and never decode on the fly.
            # A large read buffer lets one read return megabytes instead of 64 KiB.
            self._session = aiohttp.ClientSession(
                timeout=self._timeout, auto_decompress=False, headers={"Accept-Encoding": "identity"},
                read_bufsize=CHUNK_BYTES, trust_env=False,
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def request(self, method: str, url: str, *, headers: Mapping[str, str] | None = None,
                      credential: Credential = NO_CREDENTIAL, allow_redirects: bool = True,
                      **kwargs: Any) -> aiohttp.ClientResponse:
        """Send one request, mapping transport failures to Unavailable without leaking the URL's secrets."""
        shown = redact_url(url)
        sent = dict(headers or {})
        auth = credential.authorization()
        if auth:
            sent["Authorization"] = auth
        try:
            return await self.client().request(method, url, headers=sent, allow_redirects=allow_redirects,
                                               **kwargs)
        except asyncio.TimeoutError:
            raise Unavailable(f"source {shown} did not answer in time", reason="SOURCE_TIMEOUT") from None
        except aiohttp.InvalidURL:
            raise InvalidArgument(f"source_url {shown} is malformed", field=FIELD) from None
        except aiohttp.TooManyRedirects:
            raise Unavailable(f"source {shown} redirects too often", reason="SOURCE_UNAVAILABLE") from None
        except aiohttp.ClientError as exc:
            raise Unavailable(f"cannot reach source {shown}: {describe(exc)}", reason="SOURCE_UNAVAILABLE") from None

    @contextlib.asynccontextmanager
    async def open(self, url: str, *, start: int = 0, end: int | None = None,
                   credential: Credential = NO_CREDENTIAL, validator: str = "",
                   digest: str = "") -> AsyncIterator[Opened]:
        shown = redact_url(url)
        headers = {}
        if start > 0 or end is not None:
            headers["Range"] = f"bytes={start}-{'' if end is None else end - 1}"
            if validator:
                # The server sends the whole, new content instead of a range when the resource changed.
                headers["If-Range"] = validator
        response = await self.request("GET", url, headers=headers, credential=credential)
        try:
            raise_for_status(response.status, shown)
            etag = response.headers.get("ETag", "")
            current = etag if etag and not etag.startswith("W/") else response.headers.get("Last-Modified", "")
            if response.status == 206:
                match = _CONTENT_RANGE_RE.fullmatch(response.headers.get("Content-Range", "").strip())
                if match is None or int(match.group(1)) != start:
                    raise Unavailable(f"source {shown} answered a range request with the wrong range",
                                      reason="SOURCE_BAD_RANGE")
                total = None if match.group(3) == "*" else int(match.group(3))
                size = int(match.group(2)) - start + 1
                yield Opened(self._chunks(response, shown), size, total, start=start, ranges=True,
                             validator=current, digest=digest)
            else:
                ranges = response.headers.get("Accept-Ranges", "").lower() == "bytes"
                length = response.content_length
                yield Opened(self._chunks(response, shown), length, length, start=0, ranges=ranges,
                             validator=current, digest=digest)
        finally:
            # close, not release: a part reader that stops early must not drain the rest of the body.
            response.close()

    @staticmethod
    async def _chunks(response: aiohttp.ClientResponse, shown: str) -> AsyncGenerator[bytes, None]:
        content = response.content
        try:
            while True:
                chunk = await content.read(CHUNK_BYTES)
                if not chunk:
                    return
                yield chunk
        except asyncio.TimeoutError:
            raise Unavailable(f"source {shown} stalled", reason="SOURCE_TIMEOUT") from None
        except aiohttp.ClientError as exc:
            raise Unavailable(f"download from {shown} broke off: {describe(exc)}",
                              reason="SOURCE_UNAVAILABLE") from None


def raise_for_status(status: int, shown: str) -> None:
    if status < 300:
        return
    if status == 404 or status == 410:
        raise NotFound(f"source {shown} answered HTTP {status}", reason="SOURCE_NOT_FOUND",
                       metadata={"http_status": str(status)})
    if status in (401, 403):
        raise PermissionDenied(f"source {shown} answered HTTP {status}", reason="SOURCE_FORBIDDEN",
                               metadata={"http_status": str(status)})
    raise Unavailable(f"source {shown} answered HTTP {status}", reason="SOURCE_UNAVAILABLE",
                      metadata={"http_status": str(status)})


def describe(exc: BaseException) -> str:
    # aiohttp messages can embed the full request URL; keep only the exception kind and OS reason.
    if isinstance(exc, aiohttp.ClientConnectorError):
        return f"connection failed ({exc.os_error.strerror or type(exc.os_error).__name__})"
    return type(exc).__name__


class Sources:
    """Picks the fetcher for a URL's scheme."""

    def __init__(self, fetchers: Iterable[Fetcher]) -> None:
        self._by_scheme: dict[str, Fetcher] = {s: f for f in fetchers for s in f.schemes}

    def resolve(self, url: str) -> Fetcher:
        """The fetcher for `url`, after checking the URL; InvalidArgument (field source_url) otherwise."""
        parts = parse_url(url)
        fetcher = self._by_scheme.get(parts.scheme.lower())
        if fetcher is None:
            supported = ", ".join(f"{s}://" for s in sorted(self._by_scheme))
            raise InvalidArgument(
                f"source_url scheme {parts.scheme or '(none)'!r} is not supported; use one of {supported}",
                field=FIELD,
            )
        fetcher.check(parts, url)
        return fetcher
