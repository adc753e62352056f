"""HTTP answers in the REST bridge's error model: a google.rpc.Status as JSON, with grpc-gateway's HTTP status.

Shared by the bridge and by hand-made routes served beside it, so every /api/v1 refusal looks alike.
"""

from __future__ import annotations

from typing import Mapping

import grpc
from aiohttp import web
from google.rpc import error_details_pb2, status_pb2

from clowder_common.errors import HTTP_STATUS, ClowderError
from clowder_common.rest import transcode

_CODE_BY_NUMBER = {code.value[0]: code for code in grpc.StatusCode}


def grpc_code(number: int) -> grpc.StatusCode:
    return _CODE_BY_NUMBER.get(number, grpc.StatusCode.UNKNOWN)


def status_response(status: status_pb2.Status, headers: Mapping[str, str] | None = None) -> web.Response:
    """A google.rpc.Status as JSON, with the HTTP status grpc-gateway gives its code."""
    http = HTTP_STATUS.get(grpc_code(status.code), 500)
    response = web.json_response(transcode.status_json(status), status=http, headers=headers)
    retry = _retry_after(status)
    if retry is not None and http in (429, 503):
        response.headers["Retry-After"] = str(max(1, round(retry)))
    return response


def error_response(error: ClowderError) -> web.Response:
    return status_response(error.to_status())


def rpc_error_response(error: grpc.RpcError) -> web.Response:
    """What a failed upstream call answers: the server's own status, details intact."""
    return status_response(transcode.status_of_rpc_error(error))


def plain_status(code: grpc.StatusCode, message: str) -> status_pb2.Status:
    return status_pb2.Status(code=code.value[0], message=message)


def _retry_after(status: status_pb2.Status) -> float | None:
    for detail in status.details:
        if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            info = error_details_pb2.RetryInfo()
            detail.Unpack(info)
            return info.retry_delay.ToNanoseconds() / 1e9
    return None
