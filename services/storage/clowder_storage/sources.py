"""Where blobs come from: one fetcher per URL scheme behind a small interface (file://, http://, https://)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import urllib.parse
from typing import IO, Any, AsyncIterator, Awaitable, Callable, Mapping, Protocol

import aiohttp

from clowder_common.errors import InvalidArgument, NotFound, PermissionDenied, Unavailable

CHUNK_BYTES = 1 << 20
FIELD = "source_url"


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


def parse_url(url: str) -> urllib.parse.SplitResult:
    if not url:
        raise InvalidArgument("source_url is required", field=FIELD)
    if len(url) > 8192 or any(c in url for c in "\r\n\0"):
        raise InvalidArgument("source_url is malformed", field=FIELD)
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        raise InvalidArgument(f"source_url {redact_url(url)} is malformed", field=FIELD) from None
    return parts


@dataclasses.dataclass
class Opened:
    """An open source: its size when known, and its bytes."""

    chunks: AsyncIterator[bytes]
    # None when the source does not say (HTTP without Content-Length).
    size: int | None


class Fetcher(Protocol):
    """Reads one kind of source. `check` runs before anything is downloaded, so a bad URL fails fast."""

    schemes: tuple[str, ...]

    def check(self, parts: urllib.parse.SplitResult, url: str) -> None: ...

    def open(self, url: str) -> contextlib.AbstractAsyncContextManager[Opened]: ...


class FileFetcher:
    """file:///absolute/path, read in the I/O executor."""

    schemes = ("file",)

    def __init__(self, run: Callable[..., Awaitable[Any]]) -> None:
        # `run(fn, *args)` executes blocking work off the event loop (the store's bounded executor).
        self._run = run

    def check(self, parts: urllib.parse.SplitResult, url: str) -> None:
        if parts.netloc not in ("", "localhost"):
            raise InvalidArgument(f"source_url {redact_url(url)}: file:// URLs name a local path, not a host",
                                  field=FIELD)
        if not parts.path.startswith("/") or parts.query or parts.fragment:
            raise InvalidArgument(f"source_url {redact_url(url)}: expected file:///absolute/path", field=FIELD)

    @staticmethod
    def _path(url: str) -> str:
        return urllib.parse.unquote(urllib.parse.urlsplit(url).path)

    @staticmethod
    def _open_sync(path: str) -> tuple[IO[bytes], int]:
        try:
            handle = open(path, "rb")  # noqa: SIM115 - closed by the caller
        except FileNotFoundError:
            raise NotFound(f"source file://{path} does not exist", reason="SOURCE_NOT_FOUND") from None
        except PermissionError:
            raise PermissionDenied(f"source file://{path} is not readable", reason="SOURCE_FORBIDDEN") from None
        except IsADirectoryError:
            raise InvalidArgument(f"source file://{path} is a directory", field=FIELD) from None
        except OSError as exc:
            raise Unavailable(f"cannot open source file://{path}: {exc.strerror}") from None
        st = os.fstat(handle.fileno())
        return handle, st.st_size

    @contextlib.asynccontextmanager
    async def open(self, url: str) -> AsyncIterator[Opened]:
        path = self._path(url)
        handle, size = await self._run(self._open_sync, path)
        try:
            yield Opened(self._chunks(handle, path), size)
        finally:
            await self._run(handle.close)

    async def _chunks(self, handle: IO[bytes], path: str) -> AsyncIterator[bytes]:
        while True:
            try:
                chunk = await self._run(handle.read, CHUNK_BYTES)
            except OSError as exc:
                raise Unavailable(f"reading source file://{path} failed: {exc.strerror}") from None
            if not chunk:
                return
            yield chunk


class HttpFetcher:
    """http:// and https:// through one shared aiohttp session, streamed with connect, read and total timeouts."""

    schemes = ("http", "https")

    def __init__(self, connect_timeout_s: float, read_timeout_s: float, total_timeout_s: float) -> None:
        self._timeout = aiohttp.ClientTimeout(
            total=total_timeout_s, sock_connect=connect_timeout_s, sock_read=read_timeout_s
        )
        self._session: aiohttp.ClientSession | None = None

    def check(self, parts: urllib.parse.SplitResult, url: str) -> None:
        if not parts.hostname:
            raise InvalidArgument(f"source_url {redact_url(url)}: no host", field=FIELD)

    def _client(self) -> aiohttp.ClientSession:
        # Created lazily inside the running loop; aiohttp sessions are bound to one loop.
        if self._session is None or self._session.closed:
            # Digests cover the bytes as published: ask for them unencoded and never decode on the fly.
            self._session = aiohttp.ClientSession(
                timeout=self._timeout, auto_decompress=False, headers={"Accept-Encoding": "identity"}
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    @contextlib.asynccontextmanager
    async def open(self, url: str) -> AsyncIterator[Opened]:
        shown = redact_url(url)
        try:
            response = await self._client().get(url)
        except asyncio.TimeoutError:
            raise Unavailable(f"source {shown} did not answer in time", reason="SOURCE_TIMEOUT") from None
        except aiohttp.InvalidURL:
            raise InvalidArgument(f"source_url {shown} is malformed", field=FIELD) from None
        except aiohttp.ClientError as exc:
            raise Unavailable(f"cannot reach source {shown}: {_describe(exc)}", reason="SOURCE_UNAVAILABLE") from None
        try:
            _raise_for_status(response.status, shown)
            yield Opened(self._chunks(response, shown), response.content_length)
        finally:
            response.release()

    @staticmethod
    async def _chunks(response: aiohttp.ClientResponse, shown: str) -> AsyncIterator[bytes]:
        try:
            # read(n) returns whatever is buffered up to n, so fast transfers come in large pieces.
            async for chunk in response.content.iter_chunked(CHUNK_BYTES):
                yield chunk
        except asyncio.TimeoutError:
            raise Unavailable(f"source {shown} stalled", reason="SOURCE_TIMEOUT") from None
        except aiohttp.ClientError as exc:
            raise Unavailable(f"download from {shown} broke off: {_describe(exc)}",
                              reason="SOURCE_UNAVAILABLE") from None


def _raise_for_status(status: int, shown: str) -> None:
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


def _describe(exc: BaseException) -> str:
    # aiohttp messages can embed the full request URL; keep only the exception kind and OS reason.
    if isinstance(exc, aiohttp.ClientConnectorError):
        return f"connection failed ({exc.os_error.strerror or type(exc.os_error).__name__})"
    return type(exc).__name__


class Sources:
    """Picks the fetcher for a URL's scheme. Later schemes (s3://, hf://, oci://) register here."""

    def __init__(self, fetchers: list[Fetcher]) -> None:
        self._by_scheme: Mapping[str, Fetcher] = {s: f for f in fetchers for s in f.schemes}

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
