"""s3://BUCKET/KEY through boto3 (endpoint configurable), read by ranges in the I/O executor."""

from __future__ import annotations

import contextlib
import re
import urllib.parse
from typing import Any, AsyncGenerator, AsyncIterator, Awaitable, Callable

from clowder_common.errors import InvalidArgument, NotFound, PermissionDenied, Unavailable

from clowder_storage.sources import CHUNK_BYTES, FIELD, NO_CREDENTIAL, Credential, Opened

_BUCKET_RE = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")


def parse_s3(url: str) -> tuple[str, str]:
    parts = urllib.parse.urlsplit(url)
    key = urllib.parse.unquote(parts.path.lstrip("/"))
    if not _BUCKET_RE.fullmatch(parts.netloc or "") or not key or parts.query or parts.fragment:
        raise InvalidArgument("s3:// URLs look like s3://BUCKET/KEY", field=FIELD)
    return parts.netloc, key


class S3Fetcher:
    """Credentials per call (username = access key id, password = secret key) or boto3's own chain."""

    schemes = ("s3",)

    def __init__(self, run: Callable[..., Awaitable[Any]], endpoint: str = "", region: str = "us-east-1",
                 connect_timeout_s: float = 10.0, read_timeout_s: float = 30.0) -> None:
        self._run = run
        self._endpoint = endpoint or None
        self._region = region
        self._timeouts = (connect_timeout_s, read_timeout_s)

    def check(self, parts: urllib.parse.SplitResult, url: str) -> None:
        parse_s3(url)

    def _client(self, credential: Credential) -> Any:
        import boto3  # noqa: PLC0415 - imported on first s3:// use; most nodes never need it
        from botocore.config import Config  # noqa: PLC0415

        keys = {}
        if credential.username:
            keys = {"aws_access_key_id": credential.username, "aws_secret_access_key": credential.password}
        config = Config(connect_timeout=self._timeouts[0], read_timeout=self._timeouts[1],
                        retries={"max_attempts": 2})
        return boto3.session.Session().client("s3", endpoint_url=self._endpoint, region_name=self._region,
                                              config=config, **keys)

    def _get_sync(self, credential: Credential, bucket: str, key: str, start: int, end: int | None,
                  validator: str) -> tuple[Any, int, int, str, int]:
        from botocore.exceptions import BotoCoreError, ClientError  # noqa: PLC0415

        shown = f"s3://{bucket}/{key}"
        args: dict[str, Any] = {"Bucket": bucket, "Key": key}
        if start or end is not None:
            args["Range"] = f"bytes={start}-{'' if end is None else end - 1}"
        if validator and (start or end is not None):
            args["IfMatch"] = validator
        try:
            response = self._client(credential).get_object(**args)
        except ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
            if code in ("NoSuchKey", "NoSuchBucket", "404") or status == 404:
                raise NotFound(f"source {shown} does not exist", reason="SOURCE_NOT_FOUND") from None
            if code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403") or status == 403:
                raise PermissionDenied(f"source {shown} refused access ({code})", reason="SOURCE_FORBIDDEN") from None
            if code == "PreconditionFailed" or status == 412:
                # Changed since the first read: start over from a fresh read.
                return self._get_sync(credential, bucket, key, 0, None, "")
            raise Unavailable(f"source {shown} failed ({code or status})", reason="SOURCE_UNAVAILABLE") from None
        except BotoCoreError as exc:
            raise Unavailable(f"cannot reach source {shown}: {type(exc).__name__}",
                              reason="SOURCE_UNAVAILABLE") from None
        length = int(response["ContentLength"])
        content_range = response.get("ContentRange", "")
        total = int(content_range.rsplit("/", 1)[1]) if "/" in content_range else length
        first = int(content_range.split(" ")[1].split("-")[0]) if content_range else 0
        return response["Body"], length, total, response.get("ETag", ""), first

    @contextlib.asynccontextmanager
    async def open(self, url: str, *, start: int = 0, end: int | None = None,
                   credential: Credential = NO_CREDENTIAL, validator: str = "") -> AsyncIterator[Opened]:
        bucket, key = parse_s3(url)
        body, length, total, etag, first = await self._run(self._get_sync, credential, bucket, key, start, end,
                                                           validator)
        try:
            yield Opened(self._chunks(body, bucket, key), length, total, start=first, ranges=True, validator=etag)
        finally:
            await self._run(body.close)

    async def _chunks(self, body: Any, bucket: str, key: str) -> AsyncGenerator[bytes, None]:
        from botocore.exceptions import BotoCoreError  # noqa: PLC0415

        while True:
            try:
                chunk = await self._run(body.read, CHUNK_BYTES)
            except (BotoCoreError, OSError) as exc:
                raise Unavailable(f"download from s3://{bucket}/{key} broke off: {type(exc).__name__}",
                                  reason="SOURCE_UNAVAILABLE") from None
            if not chunk:
                return
            yield chunk
