"""Server interceptors: domain errors to gRPC status (one place), the admin bearer token, the service credential."""

from __future__ import annotations

import contextlib
import hmac
import logging
import uuid
from typing import Any, AsyncIterator, Awaitable, Callable

import grpc
from grpc_status import rpc_status

from clowder_common.errors import ClowderError, Internal, Unauthenticated
from clowder_common.security import SERVICE_TOKEN_HEADER

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


@contextlib.asynccontextmanager
async def _mapped(context: grpc.aio.ServicerContext, method: str,
                  guard: Callable[[Any], Awaitable[None]] | None) -> AsyncIterator[None]:
    """Run `guard`, then the body; a ClowderError leaves as its status, anything else as INTERNAL."""
    try:
        if guard is not None:
            await guard(context)
        yield
    except ClowderError as err:
        await _abort(context, err)
    except (grpc.aio.AbortError, grpc.aio.UsageError):
        raise
    except Exception as exc:
        await _abort(context, _internal(method, exc))


def _wrap(handler: grpc.RpcMethodHandler, method: str, guard: Callable[[Any], Awaitable[None]] | None):
    """Return a handler whose behaviour maps exceptions and runs `guard` first."""
    if handler.unary_unary:
        inner = handler.unary_unary

        async def unary_unary(request, context):
            async with _mapped(context, method, guard):
                return await inner(request, context)

        return grpc.unary_unary_rpc_method_handler(
            unary_unary, handler.request_deserializer, handler.response_serializer
        )
    if handler.unary_stream:
        inner_stream = handler.unary_stream

        async def unary_stream(request, context):
            async with _mapped(context, method, guard):
                async for item in inner_stream(request, context):
                    yield item

        return grpc.unary_stream_rpc_method_handler(
            unary_stream, handler.request_deserializer, handler.response_serializer
        )
    if handler.stream_unary:
        inner_su = handler.stream_unary

        async def stream_unary(request_iterator, context):
            async with _mapped(context, method, guard):
                return await inner_su(request_iterator, context)

        return grpc.stream_unary_rpc_method_handler(
            stream_unary, handler.request_deserializer, handler.response_serializer
        )
    inner_ss = handler.stream_stream

    async def stream_stream(request_iterator, context):
        async with _mapped(context, method, guard):
            async for item in inner_ss(request_iterator, context):
                yield item

    return grpc.stream_stream_rpc_method_handler(
        stream_stream, handler.request_deserializer, handler.response_serializer
    )


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """Maps ClowderError to its status with details; anything else becomes a bare INTERNAL.

    With `admin_token`, every non-public method also needs `authorization: Bearer <token>`. With
    `service_token` (runtimes, storage), every non-public method needs the cluster's service credential in
    `x-clowder-service-token`; with both, either one lets a call in (an operator's tools hold the admin token).
    """

    def __init__(self, admin_token: str | None = None, service_token: str | None = None) -> None:
        self._token = admin_token.encode() if admin_token else None
        self._service = service_token.encode() if service_token else None

    @staticmethod
    def _presented(context: grpc.aio.ServicerContext, name: str) -> str:
        for key, value in context.invocation_metadata() or ():
            if key == name:
                return value if isinstance(value, str) else value.decode()
        return ""

    def _admin_error(self, context: grpc.aio.ServicerContext) -> Unauthenticated | None:
        """None when the call carries the admin token, else why not."""
        assert self._token is not None
        scheme, _, token = self._presented(context, "authorization").partition(" ")
        if scheme.lower() != "bearer" or not token:
            return Unauthenticated("missing bearer token: send 'authorization: Bearer <admin token>'")
        # Constant-time comparison so response timing does not leak the token.
        if not hmac.compare_digest(token.encode(), self._token):
            return Unauthenticated("invalid bearer token", reason="INVALID_TOKEN")
        return None

    def _service_error(self, context: grpc.aio.ServicerContext) -> Unauthenticated | None:
        assert self._service is not None
        presented = self._presented(context, SERVICE_TOKEN_HEADER)
        if not presented:
            return Unauthenticated(
                f"missing service credential: only cluster components may call this service; they send"
                f" '{SERVICE_TOKEN_HEADER}'", reason="MISSING_SERVICE_CREDENTIAL")
        if not hmac.compare_digest(presented.encode(), self._service):
            return Unauthenticated("invalid service credential", reason="INVALID_SERVICE_CREDENTIAL")
        return None

    async def _check_token(self, context: grpc.aio.ServicerContext) -> None:
        service = self._service_error(context) if self._service is not None else None
        if self._service is not None and service is None:
            return
        admin = self._admin_error(context) if self._token is not None else None
        if self._token is not None and admin is None:
            return
        # Name the credential the caller tried, so the message points at what to fix.
        if service is not None and (admin is None or not self._presented(context, "authorization")):
            raise service
        assert admin is not None
        raise admin

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        guard = None
        if (self._token is not None or self._service is not None) and not method.startswith(PUBLIC_SERVICES):
            guard = self._check_token
        return _wrap(handler, method, guard)
