"""A gRPC frontend process of `sluice serve --frontends N`.

Run by the host as `python -m sluice.server.frontend FD INDEX`, FD being its
end of a socketpair. The frontend listens on the server's gRPC port beside its
siblings (SO_REUSEPORT: the kernel spreads connections across them), applies
TLS and the restricted-API rules, answers health from the host's pushed state,
and forwards every other call's bytes to the host (server/frontend_wire.py).
It holds no model state, so any number of them are one server to clients.

Signals: the frontend ignores SIGINT and SIGTERM (a Ctrl-C reaches the whole
process group); the host tells it when to drain. When the host goes away the
frontend stops at once.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import socket
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from sluice.server import frontend_wire as wire
from sluice.server import security
from sluice.server.streaming import stream_replies, wants_request_order

log = logging.getLogger("sluice.frontend")

CONFIG_TIMEOUT_S = 30.0

# The host's answer to one forwarded call: (gRPC status code, body).
Answer = tuple[int, bytes]


class HostLost(ConnectionError):
    pass


class HostLink(wire.FrameProtocol):
    """The frontend's side of the socketpair: calls out, replies and pushes in."""

    def __init__(self, max_body_bytes: int) -> None:
        super().__init__(max_body_bytes)
        self._next_id = 0
        self._calls: dict[int, asyncio.Future[Answer]] = {}
        loop = asyncio.get_running_loop()
        self.config: asyncio.Future[dict[str, Any]] = loop.create_future()
        self.stop: asyncio.Future[float] = loop.create_future()  # grace seconds
        self.health: health.aio.HealthServicer | None = None
        self.statuses: dict[str, bool] = {}  # the host's latest health, per service
        self._health_tasks: set[asyncio.Task[None]] = set()

    async def call(self, kind: int, method: int, seconds: float, body: bytes) -> Answer:
        if self.stop.done() and self.stop.exception() is not None:
            raise HostLost("the server's host process is gone")
        self._next_id = call_id = (self._next_id + 1) & 0xFFFFFFFF
        future: asyncio.Future[Answer] = asyncio.get_running_loop().create_future()
        self._calls[call_id] = future
        self.send(call_id, kind, method, seconds, body)
        try:
            return await future
        except asyncio.CancelledError:
            if self._calls.pop(call_id, None) is not None:
                self.send(call_id, wire.CANCEL, 0, -1.0, b"")
            raise

    def frame_received(
        self, call_id: int, kind: int, code: int, seconds: float, body: bytes
    ) -> None:
        if kind == wire.REPLY:
            future = self._calls.pop(call_id, None)
            if future is not None and not future.done():
                future.set_result((code, body))
        elif kind == wire.HEALTH:
            self.statuses.update(json.loads(body))
            task = asyncio.create_task(self.apply_health())
            self._health_tasks.add(task)
            task.add_done_callback(self._health_tasks.discard)
        elif kind == wire.CONFIG and not self.config.done():
            self.config.set_result(json.loads(body))
        elif kind == wire.STOP and not self.stop.done():
            self.stop.set_result(seconds)

    async def apply_health(self) -> None:
        if self.health is None:
            return  # applied once the health service exists
        for service, serving in list(self.statuses.items()):
            await self.health.set(
                service,
                health_pb2.HealthCheckResponse.SERVING
                if serving
                else health_pb2.HealthCheckResponse.NOT_SERVING,
            )

    def connection_lost(self, exc: Exception | None) -> None:
        lost = HostLost("the server's host process is gone")
        for future in self._calls.values():
            if not future.done():
                future.set_exception(lost)
        self._calls.clear()
        if not self.config.done():
            self.config.set_exception(lost)
        if not self.stop.done():
            self.stop.set_exception(lost)


def _unary(link: HostLink, method: int) -> Callable[[bytes, Any], Awaitable[bytes]]:
    async def forward(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        remaining = context.time_remaining()
        try:
            code, body = await link.call(
                wire.CALL, method, -1.0 if remaining is None else remaining, request
            )
        except HostLost as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
        if code:
            await context.abort(wire.STATUS_BY_CODE[code], body.decode("utf-8", "replace"))
        return body

    return forward


def _stream(link: HostLink, method: int) -> Callable[[AsyncIterator[bytes], Any], Any]:
    async def one(message: bytes) -> bytes:
        _, body = await link.call(wire.STREAM_MESSAGE, method, -1.0, message)
        return body

    async def forward(
        requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[bytes]:
        ordered = wants_request_order(context.invocation_metadata())
        try:
            async for reply in stream_replies(requests, one, ordered=ordered):
                yield reply
        except HostLost as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))

    return forward


def _handlers(link: HostLink) -> list[grpc.GenericRpcHandler]:
    """One generic handler per service: bytes in, bytes out (no decoding here)."""
    by_service: dict[str, dict[str, grpc.RpcMethodHandler]] = {}
    for index, path in enumerate(wire.METHODS):
        service, name = path[1:].rsplit("/", 1)
        if name == wire.STREAM_METHOD:
            handler = grpc.stream_stream_rpc_method_handler(_stream(link, index))
        else:
            handler = grpc.unary_unary_rpc_method_handler(_unary(link, index))
        by_service.setdefault(service, {})[name] = handler
    return [grpc.method_handlers_generic_handler(s, m) for s, m in by_service.items()]


def _tls(config: dict[str, Any] | None) -> security.TlsOptions | None:
    if config is None:
        return None
    root = config.get("root_cert")
    return security.TlsOptions(
        server_cert=Path(config["server_cert"]),
        server_key=Path(config["server_key"]),
        root_cert=Path(root) if root else None,
        mutual=bool(config.get("mutual")),
    )


def _restrictions(items: list[dict[str, Any]]) -> list[security.Restriction]:
    return [
        security.Restriction(frozenset(r["groups"]), str(r["header"]), str(r["value"]))
        for r in items
    ]


async def serve(fd: int) -> int:
    loop = asyncio.get_running_loop()
    sock = socket.socket(fileno=fd)
    _, link = await loop.create_unix_connection(lambda: HostLink(max_body_bytes=1 << 20), sock=sock)
    # The host sends the configuration at once; a frontend that never gets it
    # (a broken start) exits rather than linger ignoring signals.
    config = await asyncio.wait_for(link.config, CONFIG_TIMEOUT_S)
    link.statuses = {**config["health"], **link.statuses}
    link.max_body_bytes = int(config["max_frame_bytes"])
    restrictions = _restrictions(config["restrictions"])
    interceptors = [security.RestrictedApiInterceptor(restrictions)] if restrictions else []
    server = grpc.aio.server(
        interceptors=interceptors,
        options=[
            ("grpc.max_receive_message_length", int(config["receive_limit"])),
            ("grpc.max_send_message_length", int(config["send_limit"])),
            ("grpc.so_reuseport", 1),  # the siblings share the port on purpose
        ],
    )
    server.add_generic_rpc_handlers(_handlers(link))
    link.health = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(link.health, server)
    await link.apply_health()
    if config["reflection"]:
        reflection.enable_server_reflection(
            (*config["services"], health.SERVICE_NAME, reflection.SERVICE_NAME), server
        )
    address = f"{config['host']}:{config['port']}"
    tls = _tls(config["tls"])
    if tls is not None:
        port = server.add_secure_port(address, security.grpc_server_credentials(tls))
    else:
        port = server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"cannot listen for gRPC on {address}")
    await server.start()
    link.send(0, wire.LISTENING, 0, -1.0, str(port).encode())
    try:
        grace = await link.stop
    except HostLost:
        log.error("frontend %s: the host process is gone; stopping", config["index"])
        await server.stop(0)
        return 1
    await link.health.enter_graceful_shutdown()
    await server.stop(grace)
    return 0


def main(argv: list[str]) -> int:
    fd = int(argv[1])
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency off Windows
        return asyncio.run(serve(fd))
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(serve(fd))


if __name__ == "__main__":
    sys.exit(main(sys.argv))
