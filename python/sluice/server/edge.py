"""The one edge between gRPC and the data plane, for every sluice service:
method handlers wrapped once at registration (EdgeServer). Each

- decodes requests itself, so an undecodable message becomes INVALID_ARGUMENT
  with a one-line reason (a stream gets it in-band for that message only),
  never UNKNOWN with a traceback;
- maps SluiceError (and the core's StatusError) codes to gRPC statuses, and
  anything unexpected to INTERNAL, logged at most once per period.

Authentication and restricted APIs plug in before it: an interceptor sees
every call first (server/security.py, only when restrictions are set).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import grpc

from sluice.errors import public_message
from sluice.server import wire
from sluice.server.errors import as_sluice_error, grpc_status

log = logging.getLogger(__name__)

# Unexpected errors are logged with their traceback at most this often.
LOG_PERIOD_S = 10.0


class Undecodable:
    """A request message that could not be parsed, in place of the message."""

    __slots__ = ("reason",)

    def __init__(self, reason: str) -> None:
        self.reason = reason

    def message(self) -> str:
        return f"the request message cannot be decoded: {self.reason}"


class RateLimitedLog:
    """Logs an error with its traceback at most once per `period_s`; counts the rest."""

    def __init__(self, period_s: float = LOG_PERIOD_S) -> None:
        self._period_s = period_s
        self._next = 0.0
        self._suppressed = 0

    def error(self, what: str, exc: BaseException) -> None:
        now = time.monotonic()
        if now < self._next:
            self._suppressed += 1
            return
        extra = f" ({self._suppressed} more since the last report)" if self._suppressed else ""
        self._suppressed = 0
        self._next = now + self._period_s
        log.error("%s%s", what, extra, exc_info=exc)


UNEXPECTED = RateLimitedLog()


def _safe(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserializer is None:
        return None

    def decode(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception as exc:  # protobuf's DecodeError, and anything else it raises
            return Undecodable(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)

    return decode


async def abort(context: grpc.aio.ServicerContext, exc: BaseException) -> None:
    """Ends the call with the status `exc` stands for (always raises)."""
    error = as_sluice_error(exc)
    if error is None:
        UNEXPECTED.error("unexpected error", exc)
        await context.abort(grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}")
    else:
        await context.abort(grpc_status(error), public_message(error.message))


def error_text(exc: BaseException) -> str:
    """What a stream tells the client in-band about one failed message."""
    error = as_sluice_error(exc)
    if error is None:
        UNEXPECTED.error("unexpected error in a stream message", exc)
        return f"internal error: {type(exc).__name__}"
    return public_message(error.message)


def _unary(
    behavior: Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]],
) -> Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]:
    async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
        if isinstance(request, Undecodable):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message())
        try:
            return await behavior(request, context)
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except Exception as exc:
            await abort(context, exc)

    return call


def _streaming(
    behavior: Callable[[Any, grpc.aio.ServicerContext], AsyncIterator[Any]],
) -> Callable[[Any, grpc.aio.ServicerContext], AsyncIterator[Any]]:
    async def call(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        if isinstance(request, Undecodable):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message())
        try:
            async for item in behavior(request, context):
                yield item
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except Exception as exc:
            await abort(context, exc)

    return call


class EdgeServer:
    """Stands in for the grpc.aio server while sluice's servicers register
    (`pb_grpc.add_*_to_server(servicer, EdgeServer(server))`): each method
    handler reaches the real server wrapped once, here. An interceptor would
    do the same per call, and grpc.aio runs interceptors as a coroutine on
    every call (tens of microseconds of the event loop per request)."""

    def __init__(self, server: grpc.aio.Server) -> None:
        self._server = server

    def add_generic_rpc_handlers(self, handlers: Sequence[grpc.GenericRpcHandler]) -> None:
        self._server.add_generic_rpc_handlers(tuple(_EdgeGenericHandler(h) for h in handlers))

    def add_registered_method_handlers(
        self, service: str, handlers: dict[str, grpc.RpcMethodHandler]
    ) -> None:
        self._server.add_registered_method_handlers(
            service, {name: wrap_handler(f"/{service}/{name}", h) for name, h in handlers.items()}
        )


class _EdgeGenericHandler(grpc.GenericRpcHandler):  # type: ignore[misc]
    """A servicer's generic handler with the edge around each method (cached)."""

    def __init__(self, inner: grpc.GenericRpcHandler) -> None:
        self._inner = inner
        self._cache: dict[str, grpc.RpcMethodHandler] = {}

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        method = details.method
        wrapped = self._cache.get(method)
        if wrapped is None:
            handler = self._inner.service(details)
            if handler is None:
                return None
            wrapped = self._cache[method] = wrap_handler(method, handler)
        return wrapped


def wrap_handler(method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """`handler` with the edge's decoding and error mapping around it."""
    return _unimplemented(method, handler) or _wrap(handler, method)


def _unimplemented(method: str, h: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler | None:
    """For an RPC sluice does not implement (the generated base class's default,
    which raises NotImplementedError and so logs a traceback per call): a handler
    that answers UNIMPLEMENTED quietly. None for an implemented RPC."""
    behavior = h.unary_unary or h.unary_stream or h.stream_unary or h.stream_stream
    if not getattr(behavior, "__module__", "").endswith("_pb2_grpc"):
        return None
    message = f"{method} is not implemented by sluice"

    async def refuse(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, message)

    async def refuse_stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, message)
        yield  # pragma: no cover - abort raises

    deserialize = _safe(h.request_deserializer)
    serialize = h.response_serializer
    if h.unary_unary is not None:
        make = grpc.unary_unary_rpc_method_handler
    elif h.stream_unary is not None:
        make = grpc.stream_unary_rpc_method_handler
    elif h.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(
            refuse_stream, request_deserializer=deserialize, response_serializer=serialize
        )
    else:
        return grpc.stream_stream_rpc_method_handler(
            refuse_stream, request_deserializer=deserialize, response_serializer=serialize
        )
    return make(refuse, request_deserializer=deserialize, response_serializer=serialize)


def _wrap(h: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
    # ModelInfer's tensors skip protobuf's copies (server/wire.py).
    own_deserializer, own_serializer = wire.CODECS.get(method, (None, None))
    deserialize = _safe(own_deserializer or h.request_deserializer)
    serialize = own_serializer or h.response_serializer
    if h.unary_unary is not None and inspect.iscoroutinefunction(h.unary_unary):
        return grpc.unary_unary_rpc_method_handler(
            _unary(h.unary_unary), request_deserializer=deserialize, response_serializer=serialize
        )
    if h.stream_unary is not None and inspect.iscoroutinefunction(h.stream_unary):
        return grpc.stream_unary_rpc_method_handler(
            _unary(h.stream_unary), request_deserializer=deserialize, response_serializer=serialize
        )
    if h.unary_stream is not None and inspect.isasyncgenfunction(h.unary_stream):
        return grpc.unary_stream_rpc_method_handler(
            _streaming(h.unary_stream),
            request_deserializer=deserialize,
            response_serializer=serialize,
        )
    if h.stream_stream is not None and inspect.isasyncgenfunction(h.stream_stream):
        return grpc.stream_stream_rpc_method_handler(
            _streaming(h.stream_stream),
            request_deserializer=deserialize,
            response_serializer=serialize,
        )
    return h  # not ours to wrap (a sync handler): left as it is
