"""The host's side of `sluice serve --frontends N`: it starts N gRPC frontend
processes on one port (server/frontend.py), answers the calls they forward from
the same data plane as everything else, pushes health to them, restarts one
that dies, and drains them all on stop.

Why this shape: a grpc.aio process spends ~230 µs of CPU per unary call on
HTTP/2 and its own bookkeeping, so one process caps the whole server at a core's
worth of calls. Frontends spread that cost over cores, while the host keeps the
only copy of everything with state (models, batchers, executors, statistics,
metrics, rollouts, drift), so requests from every frontend form one batch and
the server answers as one to the outside.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import json
import logging
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import grpc
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from sluice.errors import public_message
from sluice.proto import grpc_service_pb2 as pb
from sluice.proto import sluice_service_pb2 as spb
from sluice.server import frontend_wire as wire
from sluice.server import wire as wire_codec
from sluice.server.edge import UNEXPECTED, Undecodable
from sluice.server.errors import as_sluice_error, grpc_status
from sluice.server.extension import SluiceServicer
from sluice.server.inference import InferenceServicer, stream_error

log = logging.getLogger(__name__)

# A frontend that has not listened by then failed to start.
START_TIMEOUT_S = 30.0
# Restart backoff after a frontend dies: doubles from the first to the last.
RESTART_BACKOFF_S = (0.1, 5.0)
# A frontend that lived this long resets the backoff.
HEALTHY_AFTER_S = 10.0
# Frames are bounded by the gRPC message limit plus this much of header slack.
FRAME_SLACK_BYTES = 64 * 1024

_INVALID = grpc.StatusCode.INVALID_ARGUMENT.value[0]
_INTERNAL = grpc.StatusCode.INTERNAL.value[0]
_UNIMPLEMENTED = grpc.StatusCode.UNIMPLEMENTED.value[0]


class _CallContext:
    """What the servicers read from a gRPC context, for a forwarded call: the
    deadline the client set, measured from when the host received the call."""

    __slots__ = ("_deadline",)

    def __init__(self, seconds: float) -> None:
        self._deadline = None if seconds < 0 else time.monotonic() + seconds

    def time_remaining(self) -> float | None:
        if self._deadline is None:
            return None
        return max(0.0, self._deadline - time.monotonic())


def _serialize(message: Any) -> bytes:
    data: bytes = message.SerializeToString()
    return data


def _failure(exc: BaseException) -> tuple[int, bytes]:
    error = as_sluice_error(exc)
    if error is None:
        UNEXPECTED.error("unexpected error", exc)
        return _INTERNAL, f"internal error: {type(exc).__name__}".encode()
    return grpc_status(error).value[0], public_message(error.message).encode()


class Dispatcher:
    """Runs a forwarded call on the servicers: the same code as in-process gRPC,
    with the error edge's mapping (server/edge.py) applied here."""

    def __init__(self, inference: InferenceServicer, extension: SluiceServicer) -> None:
        self._inference = inference
        self._methods: list[tuple[Any, Any, Any] | None] = []
        servicers = {
            pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name: inference,
            spb.DESCRIPTOR.services_by_name["SluiceService"].full_name: extension,
        }
        modules = {pb.DESCRIPTOR.package: pb, spb.DESCRIPTOR.package: spb}
        for path in wire.METHODS:
            service, name = path[1:].rsplit("/", 1)
            servicer = servicers[service]
            behavior = getattr(type(servicer), name)
            if name == wire.STREAM_METHOD or behavior.__module__.endswith("_pb2_grpc"):
                self._methods.append(None)  # streamed per message / not implemented
                continue
            module = modules[service.rsplit(".", 1)[0]]
            descriptor = module.DESCRIPTOR.services_by_name[service.rsplit(".", 1)[1]]
            request_type = getattr(module, descriptor.methods_by_name[name].input_type.name)
            # ModelInfer's tensors skip protobuf's copies, as in-process (server/wire.py).
            parse, serialize = wire_codec.CODECS.get(path, (None, None))
            self._methods.append(
                (
                    parse or request_type.FromString,
                    getattr(servicer, name),
                    serialize or _serialize,
                )
            )

    async def call(self, method: int, seconds: float, body: bytes) -> tuple[int, bytes]:
        entry = self._methods[method] if method < len(self._methods) else None
        if entry is None:
            name = wire.METHODS[method] if method < len(wire.METHODS) else f"method {method}"
            return _UNIMPLEMENTED, f"{name} is not implemented by sluice".encode()
        parse, behavior, serialize = entry
        try:
            request = parse(body)
        except Exception as exc:  # protobuf's DecodeError and anything it raises
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            return _INVALID, Undecodable(reason).message().encode()
        try:
            response = await behavior(request, _CallContext(seconds))
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            return _failure(exc)
        return 0, serialize(response)

    async def stream_message(self, body: bytes) -> tuple[int, bytes]:
        """One ModelStreamInfer message: always a stream response (errors in-band)."""
        try:
            request = wire_codec.parse_infer_request(body)
        except Exception as exc:
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            reply = pb.ModelStreamInferResponse(error_message=Undecodable(reason).message())
            return 0, reply.SerializeToString()
        try:
            return 0, await self._inference.stream_bytes(request)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            return 0, stream_error(request, exc).SerializeToString()


class FrontendConnection(wire.FrameProtocol):
    """The host's end of one frontend's socketpair."""

    def __init__(self, index: int, dispatcher: Dispatcher, max_body_bytes: int) -> None:
        super().__init__(max_body_bytes)
        self.index = index
        self.calls = 0
        self._dispatcher = dispatcher
        self._tasks: dict[int, asyncio.Task[tuple[int, bytes]]] = {}
        loop = asyncio.get_running_loop()
        self._loop = loop
        self.listening: asyncio.Future[int] = loop.create_future()
        self.closed: asyncio.Future[None] = loop.create_future()

    def frame_received(
        self, call_id: int, kind: int, code: int, seconds: float, body: bytes
    ) -> None:
        if kind == wire.CALL or kind == wire.STREAM_MESSAGE:
            self.calls += 1
            coro = (
                self._dispatcher.call(code, seconds, body)
                if kind == wire.CALL
                else self._dispatcher.stream_message(body)
            )
            task = self._loop.create_task(coro)
            self._tasks[call_id] = task
            task.add_done_callback(functools.partial(self._answer, call_id))
        elif kind == wire.CANCEL:
            cancelled = self._tasks.pop(call_id, None)
            if cancelled is not None:
                cancelled.cancel()
        elif kind == wire.LISTENING and not self.listening.done():
            self.listening.set_result(int(body))

    def _answer(self, call_id: int, task: asyncio.Task[tuple[int, bytes]]) -> None:
        if call_id not in self._tasks or task.cancelled():
            return  # cancelled by the frontend: its client is gone
        del self._tasks[call_id]
        exc = task.exception()
        code, body = _failure(exc) if exc is not None else task.result()
        self.send(call_id, wire.REPLY, code, -1.0, body)

    def connection_lost(self, exc: Exception | None) -> None:
        # The frontend is gone, and its clients with it: stop their calls
        # (each releases what it holds through cancellation).
        for task in self._tasks.values():
            task.cancel()
        self._tasks.clear()
        if not self.closed.done():
            self.closed.set_result(None)


@dataclasses.dataclass(frozen=True)
class FrontendConfig:
    host: str
    port: int
    receive_limit: int
    send_limit: int
    tls: dict[str, Any] | None
    restrictions: list[dict[str, Any]]
    reflection: bool
    services: list[str]


class FrontendPool:
    """N frontend processes on one port; index 0 picks the port when it is 0."""

    def __init__(self, count: int, config: FrontendConfig, dispatcher: Dispatcher) -> None:
        if count < 1:
            raise ValueError("frontends must be at least 1")
        self.count = count
        self.port = config.port
        self.restarts = 0
        self._config = config
        self._dispatcher = dispatcher
        self._max_body_bytes = max(config.receive_limit, config.send_limit) + FRAME_SLACK_BYTES
        self._connections: list[FrontendConnection | None] = [None] * count
        self._processes: list[subprocess.Popen[bytes] | None] = [None] * count
        self._watchers: set[asyncio.Task[None]] = set()
        self._health: dict[str, bool] = {}
        self._stopping = False
        self._delay_s: dict[int, float] = {}  # next restart delay, per frontend

    # ---- start and restart ----------------------------------------------------

    async def start(self) -> None:
        self.port = await self._spawn(0, self._config.port)
        await asyncio.gather(*(self._spawn(i, self.port) for i in range(1, self.count)))

    async def _spawn(self, index: int, port: int) -> int:
        loop = asyncio.get_running_loop()
        # Forking this (large) process takes milliseconds: not on the loop.
        process, parent = await asyncio.to_thread(_launch, index)
        _, connection = await loop.create_unix_connection(
            lambda: FrontendConnection(index, self._dispatcher, self._max_body_bytes), sock=parent
        )
        config = {
            **dataclasses.asdict(self._config),
            "port": port,
            "index": index,
            "health": self._health,
            "max_frame_bytes": self._max_body_bytes,
        }
        connection.send(0, wire.CONFIG, 0, -1.0, json.dumps(config).encode())
        done, _ = await asyncio.wait(
            (connection.listening, connection.closed),
            timeout=START_TIMEOUT_S,
            return_when=asyncio.FIRST_COMPLETED,
        )
        if connection.listening not in done:
            assert connection.transport is not None
            connection.transport.close()
            await _reap(process)
            raise OSError(
                f"gRPC frontend {index} did not start listening on {self._config.host}:{port} "
                f"(exit status {process.returncode}; its log is above)"
            )
        self._connections[index] = connection
        self._processes[index] = process
        watcher = asyncio.create_task(self._watch(index, connection, process, time.monotonic()))
        self._watchers.add(watcher)
        watcher.add_done_callback(self._watchers.discard)
        return connection.listening.result()

    async def _watch(
        self,
        index: int,
        connection: FrontendConnection,
        process: subprocess.Popen[bytes],
        started: float,
    ) -> None:
        await connection.closed
        status = await _reap(process)
        if self._stopping:
            return
        self._connections[index] = None
        self.restarts += 1
        log.error(
            "gRPC frontend %d (pid %d) exited with status %s; restarting it",
            index,
            process.pid,
            status,
        )
        first, longest = RESTART_BACKOFF_S
        lived_s = time.monotonic() - started
        delay = first if lived_s >= HEALTHY_AFTER_S else self._delay_s.get(index, first)
        while True:
            await asyncio.sleep(delay)
            delay = self._delay_s[index] = min(longest, delay * 2)
            if self.stopping():
                return
            try:
                await self._spawn(index, self.port)
                return
            except OSError as exc:
                log.error("gRPC frontend %d did not restart: %s", index, exc)

    def stopping(self) -> bool:
        return self._stopping

    # ---- health, stop, figures ------------------------------------------------

    def push_health(self, statuses: dict[str, bool]) -> None:
        self._health = dict(statuses)
        body = json.dumps(statuses).encode()
        for connection in self._connections:
            if connection is not None:
                connection.send(0, wire.HEALTH, 0, -1.0, body)

    async def stop(self, grace_s: float) -> None:
        """Every frontend drains (no new calls; accepted ones finish, answered by
        this host which keeps serving) within the grace period, then exits."""
        self._stopping = True
        live = [
            (c, p)
            for c, p in zip(self._connections, self._processes, strict=True)
            if c is not None and p is not None
        ]
        for connection, _ in live:
            connection.send(0, wire.STOP, 0, grace_s, b"")
        await asyncio.gather(*(_reap(p, grace_s + 5.0) for _, p in live))
        for watcher in list(self._watchers):
            watcher.cancel()

    def pids(self) -> list[int]:
        return [p.pid for p in self._processes if p is not None and p.poll() is None]

    def calls(self) -> Iterator[tuple[int, int]]:
        for index, connection in enumerate(self._connections):
            if connection is not None:
                yield index, connection.calls


def _launch(index: int) -> tuple[subprocess.Popen[bytes], socket.socket]:
    parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        process = subprocess.Popen(
            [sys.executable, "-m", "sluice.server.frontend", str(child.fileno()), str(index)],
            pass_fds=(child.fileno(),),
            stdin=subprocess.DEVNULL,
        )
    except BaseException:
        parent.close()
        raise
    finally:
        child.close()
    return process, parent


async def _reap(process: subprocess.Popen[bytes], timeout_s: float = 5.0) -> int:
    """Waits for a frontend to exit, killing it after `timeout_s`; its status."""
    try:
        return await asyncio.to_thread(process.wait, timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        return await asyncio.to_thread(process.wait)


class FrontendCollector(Collector):
    """The frontends' own figures; every model figure comes from the host alone."""

    def __init__(self, pool: FrontendPool) -> None:
        self._pool = pool

    def collect(self) -> Iterator[Metric]:
        live = GaugeMetricFamily("sluice_frontends", "gRPC frontend processes serving")
        live.add_metric([], len(self._pool.pids()))
        restarts = CounterMetricFamily(
            "sluice_frontend_restarts", "gRPC frontend processes restarted after dying"
        )
        restarts.add_metric([], self._pool.restarts)
        calls = CounterMetricFamily(
            "sluice_frontend_calls",
            "Calls and stream messages forwarded by each gRPC frontend since it started",
            labels=["frontend"],
        )
        for index, count in self._pool.calls():
            calls.add_metric([str(index)], count)
        yield from (live, restarts, calls)
