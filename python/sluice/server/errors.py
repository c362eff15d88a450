"""The one place SluiceError codes become gRPC status codes."""

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
