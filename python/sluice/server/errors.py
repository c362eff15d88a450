"""The one place SluiceError codes become transport statuses: gRPC status codes
and, beside them, the HTTP statuses of the REST frontend."""

from __future__ import annotations

import grpc

from sluice import _core
from sluice.errors import ErrorCode, SluiceError, from_code

STATUS: dict[ErrorCode, grpc.StatusCode] = {
    ErrorCode.INVALID_ARGUMENT: grpc.StatusCode.INVALID_ARGUMENT,
    ErrorCode.NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    ErrorCode.UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
    ErrorCode.RESOURCE_EXHAUSTED: grpc.StatusCode.RESOURCE_EXHAUSTED,
    ErrorCode.DEADLINE_EXCEEDED: grpc.StatusCode.DEADLINE_EXCEEDED,
    ErrorCode.CANCELLED: grpc.StatusCode.CANCELLED,
    ErrorCode.INTERNAL: grpc.StatusCode.INTERNAL,
}

# Triton's HTTP API answers 400 for most errors; the finer codes let clients and
# load balancers tell "fix the request" from "retry later" from "retry elsewhere".
HTTP_STATUS: dict[ErrorCode, int] = {
    ErrorCode.INVALID_ARGUMENT: 400,
    ErrorCode.NOT_FOUND: 404,
    ErrorCode.UNAVAILABLE: 503,
    ErrorCode.RESOURCE_EXHAUSTED: 429,  # a full queue: retry after backing off
    ErrorCode.DEADLINE_EXCEEDED: 504,
    ErrorCode.CANCELLED: 499,  # the client went away (nginx's code; nobody reads it)
    ErrorCode.INTERNAL: 500,
}


def as_sluice_error(exc: BaseException) -> SluiceError | None:
    """The SluiceError an exception stands for, or None if it is unexpected."""
    if isinstance(exc, SluiceError):
        return exc
    if isinstance(exc, _core.StatusError):
        code, message = exc.args
        return from_code(str(code), str(message))
    return None


def grpc_status(error: SluiceError) -> grpc.StatusCode:
    return STATUS[error.code]


def http_status(error: SluiceError) -> int:
    return HTTP_STATUS[error.code]
