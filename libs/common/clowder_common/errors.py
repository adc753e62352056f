"""One exception hierarchy for the whole system, and its mapping to gRPC status with rich details."""

from __future__ import annotations

from dataclasses import dataclass

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

ERROR_DOMAIN = "clowder.dev"


@dataclass(frozen=True)
class FieldViolation:
    field: str
    description: str


class ClowderError(Exception):
    """Base of every error a Clowder service reports on purpose.

    `reason` is a stable UPPER_SNAKE identifier for machines (ErrorInfo.reason);
    the message is for people and must not hold secrets.
    """

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN
    default_reason = "UNKNOWN"

    def __init__(
        self,
        message: str,
        *,
        reason: str | None = None,
        metadata: dict[str, str] | None = None,
        field: str | None = None,
        violations: list[FieldViolation] | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason or self.default_reason
        self.metadata = dict(metadata or {})
        self.violations = list(violations or [])
        if field is not None:
            self.violations.append(FieldViolation(field, message))
        self.retry_after = retry_after

    def to_status(self) -> status_pb2.Status:
        details: list[any_pb2.Any] = []
        info = error_details_pb2.ErrorInfo(reason=self.reason, domain=ERROR_DOMAIN, metadata=self.metadata)
        details.append(_pack(info))
        if self.violations:
            bad = error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(field=v.field, description=v.description)
                    for v in self.violations
                ]
            )
            details.append(_pack(bad))
        if self.retry_after is not None:
            delay = duration_pb2.Duration()
            delay.FromNanoseconds(int(self.retry_after * 1e9))
            details.append(_pack(error_details_pb2.RetryInfo(retry_delay=delay)))
        return status_pb2.Status(code=self.code.value[0], message=self.message, details=details)


def _pack(message) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


class InvalidArgument(ClowderError):
    code = grpc.StatusCode.INVALID_ARGUMENT
    default_reason = "INVALID_ARGUMENT"


class NotFound(ClowderError):
    code = grpc.StatusCode.NOT_FOUND
    default_reason = "NOT_FOUND"


class AlreadyExists(ClowderError):
    code = grpc.StatusCode.ALREADY_EXISTS
    default_reason = "ALREADY_EXISTS"


class FailedPrecondition(ClowderError):
    code = grpc.StatusCode.FAILED_PRECONDITION
    default_reason = "FAILED_PRECONDITION"


class Aborted(ClowderError):
    """A concurrent change won a compare-and-swap; the caller may read again and retry."""

    code = grpc.StatusCode.ABORTED
    default_reason = "CONCURRENT_MODIFICATION"


class Unavailable(ClowderError):
    code = grpc.StatusCode.UNAVAILABLE
    default_reason = "UNAVAILABLE"


class Unauthenticated(ClowderError):
    code = grpc.StatusCode.UNAUTHENTICATED
    default_reason = "UNAUTHENTICATED"


class PermissionDenied(ClowderError):
    code = grpc.StatusCode.PERMISSION_DENIED
    default_reason = "PERMISSION_DENIED"


class ResourceExhausted(ClowderError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    default_reason = "RESOURCE_EXHAUSTED"


class DataLoss(ClowderError):
    code = grpc.StatusCode.DATA_LOSS
    default_reason = "DATA_LOSS"


class DeadlineExceeded(ClowderError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED
    default_reason = "DEADLINE_EXCEEDED"


class Internal(ClowderError):
    """Never carries the underlying exception's text to the caller."""

    code = grpc.StatusCode.INTERNAL
    default_reason = "INTERNAL"


_BY_CODE: dict[grpc.StatusCode, type[ClowderError]] = {
    cls.code: cls
    for cls in (
        InvalidArgument,
        NotFound,
        AlreadyExists,
        FailedPrecondition,
        Aborted,
        Unavailable,
        Unauthenticated,
        PermissionDenied,
        ResourceExhausted,
        DataLoss,
        DeadlineExceeded,
        Internal,
    )
}


def from_rpc_error(error: grpc.RpcError) -> ClowderError:
    """Decode a failed call (including its google.rpc.Status details) into our hierarchy.

    Lets one service relay another's error with its code and reason intact.
    """
    code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
    message = error.details() if hasattr(error, "details") else str(error)
    cls = _BY_CODE.get(code, ClowderError)
    reason = None
    metadata: dict[str, str] = {}
    violations: list[FieldViolation] = []
    retry_after = None
    status = None
    try:
        status = rpc_status.from_call(error)
    except Exception:  # a non-call RpcError, or details that do not parse
        status = None
    if status is not None:
        for detail in status.details:
            if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                detail.Unpack(info)
                reason, metadata = info.reason, dict(info.metadata)
            elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                bad = error_details_pb2.BadRequest()
                detail.Unpack(bad)
                violations = [FieldViolation(v.field, v.description) for v in bad.field_violations]
            elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
                info_retry = error_details_pb2.RetryInfo()
                detail.Unpack(info_retry)
                retry_after = info_retry.retry_delay.ToNanoseconds() / 1e9
    err = cls(message or code.name, reason=reason, metadata=metadata, violations=violations, retry_after=retry_after)
    if cls is ClowderError:
        err.code = code
    return err


# HTTP statuses for gRPC codes, as grpc-gateway maps them.
HTTP_STATUS: dict[grpc.StatusCode, int] = {
    grpc.StatusCode.OK: 200,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNKNOWN: 500,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.INTERNAL: 500,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DATA_LOSS: 500,
    grpc.StatusCode.UNAUTHENTICATED: 401,
}

assert code_pb2.OK == 0  # google.rpc.Code and grpc.StatusCode share numbers
