"""The wire between the host process and its gRPC frontend processes
(`sluice serve --frontends N`): length-prefixed frames on a socketpair.

A frontend terminates gRPC (HTTP/2, TLS, restrictions, health, reflection) and
forwards each call's request bytes untouched; the host decodes, runs the data
plane and answers with the response bytes or a status. Messages are never
decoded twice, and the frontend holds no model state: one host, one set of
batchers, executors, statistics and metrics, whatever N is.

Frame: HEADER (body length, call id, kind, code, seconds) then the body.
"""

from __future__ import annotations

import asyncio
import struct

import grpc

from sluice.proto import grpc_service_pb2 as pb
from sluice.proto import sluice_service_pb2 as spb

# body length u32, call id u32, kind u8, code u16 (method index or status), seconds f64
HEADER = struct.Struct("<IIBHd")

# frontend -> host
CALL = 1  # code: method index; seconds: time remaining (< 0: none); body: request
STREAM_MESSAGE = 2  # one ModelStreamInfer message; the reply body is a stream response
CANCEL = 3  # the client went away: the host cancels the call
LISTENING = 4  # body: the port this frontend listens on (ASCII)
# host -> frontend
REPLY = 10  # code: gRPC status (0 OK); body: response, or the error's details (UTF-8)
HEALTH = 11  # body: JSON {service: serving}
CONFIG = 12  # body: JSON frontend configuration (first frame)
STOP = 13  # seconds: grace; the frontend drains and exits

STREAM_METHOD = "ModelStreamInfer"


def _methods() -> tuple[str, ...]:
    """Every RPC of sluice's two services as "/package.Service/Method", in a
    fixed order both sides compute alike (a method travels as its index)."""
    paths: list[str] = []
    for module, service in (
        (pb, "GRPCInferenceService"),
        (spb, "SluiceService"),
    ):
        descriptor = module.DESCRIPTOR.services_by_name[service]
        paths.extend(f"/{descriptor.full_name}/{m.name}" for m in descriptor.methods)
    return tuple(paths)


METHODS = _methods()
STATUS_BY_CODE: dict[int, grpc.StatusCode] = {s.value[0]: s for s in grpc.StatusCode}


class FrameProtocol(asyncio.Protocol):
    """Splits the byte stream into frames; `frame_received` gets each one.
    A frame longer than `max_body_bytes` is a broken peer: the connection closes."""

    def __init__(self, max_body_bytes: int) -> None:
        self.max_body_bytes = max_body_bytes
        self._buffer = bytearray()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is a WriteTransport

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer
        if not buffer and len(data) >= HEADER.size:
            # Fast path: whole frames in one read, nothing buffered.
            view = memoryview(data)
            pos = self._frames(view, 0)
            if pos < len(data):
                buffer += view[pos:]
            return
        buffer += data
        with memoryview(buffer) as view:
            pos = self._frames(view, 0)
        if pos:
            del buffer[:pos]

    def _frames(self, view: memoryview, pos: int) -> int:
        size = HEADER.size
        end_of_data = len(view)
        while end_of_data - pos >= size:
            body_bytes, call_id, kind, code, seconds = HEADER.unpack_from(view, pos)
            if body_bytes > self.max_body_bytes:
                assert self.transport is not None
                self.transport.close()
                return end_of_data
            end = pos + size + body_bytes
            if end > end_of_data:
                break
            self.frame_received(call_id, kind, code, seconds, bytes(view[pos + size : end]))
            pos = end
        return pos

    def send(self, call_id: int, kind: int, code: int, seconds: float, body: bytes) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        transport.writelines((HEADER.pack(len(body), call_id, kind, code, seconds), body))

    def frame_received(
        self, call_id: int, kind: int, code: int, seconds: float, body: bytes
    ) -> None:
        raise NotImplementedError
