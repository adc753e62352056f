"""Server interceptors: domain errors to gRPC status (one place), and the admin bearer token."""

from __future__ import annotations

import hmac
import logging
import uuid
from typing import Any, Awaitable, Callable

import grpc
from grpc_status import rpc_status

from clowder_common.errors import ClowderError, Internal, Unauthenticated

log = logging.getLogger(__name__)

# Methods anyone may call: probes and service discovery.
PUBLIC_SERVICES = ("/grpc.health.v1.Health/", "/grpc.reflection.")


async def _abort(context: grpc.aio.ServicerContext, error: ClowderError) -> None:
    await context.abort_with_status(rpc_status.to_status(error.to_status()))


def _internal(method: str, exc: BaseException) -> Internal:
    # The caller gets an incident id to quote; the details stay in our log.
    incident = uuid.uuid4().hex[:12]
    log.error("unhandled error in %s (incident %s)", method, incident, exc_info=exc)
    return Internal(f"internal error (incident {incident})", metadata={"incident": incident})


def _wrap(handler: grpc.RpcMethodHandler, method: str, guard: Callable[[Any], Awaitable[None]] | None):
    """Return a handler whose behaviour maps exceptions and runs `guard` first."""

    async def check(context) -> None:
        if guard is not None:
            await guard(context)

    if handler.unary_unary:
        inner = handler.unary_unary

        async def unary_unary(request, context):
            try:
                await check(context)
                return await inner(request, context)
            except ClowderError as err:
                await _abort(context, err)
            except (grpc.aio.AbortError, grpc.aio.UsageError):
                raise
            except Exception as exc:
                await _abort(context, _internal(method, exc))

        return grpc.unary_unary_rpc_method_handler(
            unary_unary, handler.request_deserializer, handler.response_serializer
        )
    if handler.unary_stream:
        inner_stream = handler.unary_stream

        async def unary_stream(request, context):
            try:
                await check(context)
                async for item in inner_stream(request, context):
                    yield item
            except ClowderError as err:
                await _abort(context, err)
            except (grpc.aio.AbortError, grpc.aio.UsageError):
                raise
            except Exception as exc:
                await _abort(context, _internal(method, exc))

        return grpc.unary_stream_rpc_method_handler(
            unary_stream, handler.request_deserializer, handler.response_serializer
        )
    if handler.stream_unary:
        inner_su = handler.stream_unary

        async def stream_unary(request_iterator, context):
            try:
                await check(context)
                return await inner_su(request_iterator, context)
            except ClowderError as err:
                await _abort(context, err)
            except (grpc.aio.AbortError, grpc.aio.UsageError):
                raise
            except Exception as exc:
                await _abort(context, _internal(method, exc))

        return grpc.stream_unary_rpc_method_handler(
            stream_unary, handler.request_deserializer, handler.response_serializer
        )
    inner_ss = handler.stream_stream

    async def stream_stream(request_iterator, context):
        try:
            await check(context)
            async for item in inner_ss(request_iterator, context):
                yield item
        except ClowderError as err:
            await _abort(context, err)
        except (grpc.aio.AbortError, grpc.aio.UsageError):
            raise
        except Exception as exc:
            await _abort(context, _internal(method, exc))

    return grpc.stream_stream_rpc_method_handler(
        stream_stream, handler.request_deserializer, handler.response_serializer
    )


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """Maps ClowderError to its status with details; anything else becomes a bare INTERNAL.

    With `admin_token`, every non-public method also needs `authorization: Bearer <token>`.
    """

    def __init__(self, admin_token: str | None = None) -> None:
        self._token = admin_token.encode() if admin_token else None

    async def _check_token(self, context: grpc.aio.ServicerContext) -> None:
        assert self._token is not None
        presented = ""
        for key, value in context.invocation_metadata() or ():
            if key == "authorization":
                presented = value if isinstance(value, str) else value.decode()
                break
        scheme, _, token = presented.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise Unauthenticated("missing bearer token: send 'authorization: Bearer <admin token>'")
        # Constant-time comparison so response timing does not leak the token.
        if not hmac.compare_digest(token.encode(), self._token):
            raise Unauthenticated("invalid bearer token", reason="INVALID_TOKEN")

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        guard = None
        if self._token is not None and not method.startswith(PUBLIC_SERVICES):
            guard = self._check_token
        return _wrap(handler, method, guard)
