"""The SluiceError tree. Codes are transport-neutral; server/ maps them to gRPC
status codes in one place (server/errors.py)."""

from __future__ import annotations

import enum


class ErrorCode(enum.Enum):
    # Values equal the C++ core's StatusCodeName(), so core errors map 1:1.
    INVALID_ARGUMENT = "invalid_argument"
    NOT_FOUND = "not_found"
    UNAVAILABLE = "unavailable"
    RESOURCE_EXHAUSTED = "resource_exhausted"
    DEADLINE_EXCEEDED = "deadline_exceeded"
    CANCELLED = "cancelled"
    INTERNAL = "internal"


class SluiceError(Exception):
    code: ErrorCode = ErrorCode.INTERNAL

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgumentError(SluiceError):
    code = ErrorCode.INVALID_ARGUMENT


class NotFoundError(SluiceError):
    code = ErrorCode.NOT_FOUND


class UnavailableError(SluiceError):
    code = ErrorCode.UNAVAILABLE


class ResourceExhaustedError(SluiceError):
    code = ErrorCode.RESOURCE_EXHAUSTED


class DeadlineExceededError(SluiceError):
    code = ErrorCode.DEADLINE_EXCEEDED


class CancelledError(SluiceError):
    code = ErrorCode.CANCELLED


class InternalError(SluiceError):
    code = ErrorCode.INTERNAL


class ModelLoadError(SluiceError):
    """A model version could not be loaded; the message is the reason shown to users."""

    code = ErrorCode.UNAVAILABLE


_BY_CODE: dict[ErrorCode, type[SluiceError]] = {
    cls.code: cls
    for cls in (
        InvalidArgumentError,
        NotFoundError,
        UnavailableError,
        ResourceExhaustedError,
        DeadlineExceededError,
        CancelledError,
        InternalError,
    )
}


def from_code(code_name: str, message: str) -> SluiceError:
    """The SluiceError for a code name (as raised by sluice._core.StatusError)."""
    try:
        code = ErrorCode(code_name)
    except ValueError:
        code = ErrorCode.INTERNAL
    return _BY_CODE[code](message)


# A name, key or value a client sent, shown in a message: at most this many characters.
MAX_SHOWN_CHARS = 128
# A whole message leaving the server: at most this many characters.
MAX_MESSAGE_CHARS = 4096


def shown(text: str, limit: int = MAX_SHOWN_CHARS) -> str:
    """Client-sent `text` (a model, tensor or parameter name) for an error message:
    escaped to one printable line (newlines, NUL, bidi controls as escapes) and
    at most `limit` characters. A client's data is never echoed raw."""
    out = repr(text[: limit + 1])[1:-1]
    return out if len(out) <= limit and len(text) <= limit else out[: limit - 3] + "..."


def public_message(message: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    """A whole message for a client, as the transports send it: non-printable
    characters escaped, at most `limit` characters. The backstop behind `shown`
    for text that reaches a message some other way (a library's error)."""
    if len(message) <= limit and message.isprintable():
        return message
    head = message[:limit]
    out = "".join(c if c.isprintable() else repr(c)[1:-1] for c in head)
    if len(out) > limit or len(message) > limit:
        out = out[: limit - 3] + "..."
    return out
