"""The OpenAI-shaped HTTP routes: /v1/files and /v1/batches (errors go through the HTTP face's middleware)."""

from __future__ import annotations

from typing import Any

from aiohttp import BodyPartReader, web

from clowder_common.errors import InvalidArgument

from clowder_balancer import openai_api
from clowder_balancer.apikeys import ApiKeyStore, Principal, bearer
from clowder_balancer.batch.service import BatchApi
from clowder_balancer.batch.shapes import batch_object, file_object, page

READ_CHUNK = 1 << 16
MAX_FIELD_BYTES = 1024
MAX_LIMIT = 10_000


class BatchHttp:
    def __init__(self, api: BatchApi, keys: ApiKeyStore, require_keys: bool) -> None:
        self._api = api
        self._keys = keys
        self._require_keys = require_keys

    def install(self, app: web.Application) -> None:
        app.router.add_post("/v1/files", self._create_file)
        app.router.add_get("/v1/files", self._list_files)
        app.router.add_get("/v1/files/{id}", self._get_file)
        app.router.add_delete("/v1/files/{id}", self._delete_file)
        app.router.add_get("/v1/files/{id}/content", self._file_content)
        app.router.add_post("/v1/batches", self._create_batch)
        app.router.add_get("/v1/batches", self._list_batches)
        app.router.add_get("/v1/batches/{id}", self._get_batch)
        app.router.add_post("/v1/batches/{id}/cancel", self._cancel_batch)

    def _principal(self, request: web.Request) -> Principal:
        return self._keys.authenticate(bearer(request.headers.get("Authorization")), self._require_keys)

    # -- files -----------------------------------------------------------------------------------

    async def _create_file(self, request: web.Request) -> web.Response:
        principal = self._principal(request)
        if not request.content_type.startswith("multipart/"):
            raise InvalidArgument("Upload the file as multipart/form-data with fields 'file' and 'purpose'.",
                                  field="file")
        limit = self._api.settings.max_file_bytes
        purpose, filename, content = "", "", None
        # Read part by part (the body limit of JSON requests does not apply to files; this one does).
        reader = await request.multipart()
        while (part := await reader.next()) is not None:
            if not isinstance(part, BodyPartReader):
                # A nested multipart is no field of ours.
                continue
            if part.name == "purpose":
                purpose = (await part.read(decode=True))[:MAX_FIELD_BYTES].decode(errors="replace").strip()
            elif part.name == "file":
                filename = part.filename or "upload.jsonl"
                chunks, size = [], 0
                while chunk := await part.read_chunk(READ_CHUNK):
                    size += len(chunk)
                    if size > limit:
                        raise InvalidArgument(f"File is too large: more than {limit} bytes.", field="file",
                                              reason="FILE_TOO_LARGE")
                    chunks.append(chunk)
                content = b"".join(chunks)
            else:
                await part.release()
        if content is None:
            raise InvalidArgument("Missing required parameter: 'file'.", field="file")
        if not purpose:
            raise InvalidArgument("Missing required parameter: 'purpose'.", field="purpose")
        f = await self._api.create_file(principal, filename, purpose, content)
        return web.json_response(file_object(f))

    async def _list_files(self, request: web.Request) -> web.Response:
        principal = self._principal(request)
        order = request.query.get("order", "desc")
        if order not in ("asc", "desc"):
            raise InvalidArgument("Invalid 'order': expected 'asc' or 'desc'.", field="order")
        files, more = await self._api.list_files(principal, request.query.get("after", ""),
                                                 _limit(request, 10_000), request.query.get("purpose", ""),
                                                 ascending=order == "asc")
        return web.json_response(page([file_object(f) for f in files], more))

    async def _get_file(self, request: web.Request) -> web.Response:
        f = await self._api.get_file(self._principal(request), request.match_info["id"])
        return web.json_response(file_object(f))

    async def _delete_file(self, request: web.Request) -> web.Response:
        file_id = request.match_info["id"]
        await self._api.delete_file(self._principal(request), file_id)
        return web.json_response({"id": file_id, "object": "file", "deleted": True})

    async def _file_content(self, request: web.Request) -> web.Response:
        content = await self._api.file_content(self._principal(request), request.match_info["id"])
        return web.Response(body=content, content_type="application/octet-stream")

    # -- batches ---------------------------------------------------------------------------------

    async def _create_batch(self, request: web.Request) -> web.Response:
        principal = self._principal(request)
        body = openai_api.decode_body(await request.read())
        metadata = body.get("metadata") or {}
        if not isinstance(metadata, dict):
            raise InvalidArgument("Invalid type for 'metadata': expected an object.", field="metadata")
        batch = await self._api.create_batch(principal, _string(body, "input_file_id"), _string(body, "endpoint"),
                                             _string(body, "completion_window"), metadata)
        return web.json_response(batch_object(batch))

    async def _list_batches(self, request: web.Request) -> web.Response:
        batches, more = await self._api.list_batches(self._principal(request), request.query.get("after", ""),
                                                     _limit(request, 20))
        return web.json_response(page([batch_object(b) for b in batches], more))

    async def _get_batch(self, request: web.Request) -> web.Response:
        batch = await self._api.get_batch(self._principal(request), request.match_info["id"])
        return web.json_response(batch_object(batch))

    async def _cancel_batch(self, request: web.Request) -> web.Response:
        batch = await self._api.cancel_batch(self._principal(request), request.match_info["id"])
        return web.json_response(batch_object(batch))


def _string(body: dict[str, Any], name: str) -> str:
    value = body.get(name)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise InvalidArgument(f"Invalid type for '{name}': expected a string.", field=name)
    return value


def _limit(request: web.Request, default: int) -> int:
    raw = request.query.get("limit")
    if raw is None:
        return default
    if not raw.isdigit() or not 1 <= int(raw) <= MAX_LIMIT:
        raise InvalidArgument(f"Invalid 'limit': expected an integer between 1 and {MAX_LIMIT}.", field="limit")
    return int(raw)
