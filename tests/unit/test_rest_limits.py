"""The REST server's bounds, driven over real sockets in-process: connections over
the limit are answered 503, a body that does not arrive in time is answered 408,
a request head that never completes is closed after the idle timeout. On uvloop,
as the server runs."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path

import uvloop
from sluice.host import DataPlane, ExecutorLoader, ModelManager
from sluice.runtime import RuntimeOptions
from sluice.server.rest import RestLimits, RestServer


def _run(limits: RestLimits, tmp_path: Path, body: Callable[[int], Awaitable[None]]) -> None:
    async def main() -> None:
        models = ModelManager(tmp_path, ExecutorLoader(RuntimeOptions()))
        dataplane = DataPlane(models, server_name="t", server_version="0", is_ready=lambda: True)
        server = RestServer(dataplane, "127.0.0.1", 0, None, limits)
        await server.start()
        try:
            await asyncio.wait_for(body(server.port), 30)
        finally:
            await server.stop(1.0)

    uvloop.run(main())  # the server's own loop (its transports are not asyncio's classes)


async def _status_line(reader: asyncio.StreamReader) -> bytes:
    return await reader.readline()


def test_connections_over_the_limit_get_503(tmp_path: Path) -> None:
    async def body(port: int) -> None:
        held = [await asyncio.open_connection("127.0.0.1", port) for _ in range(2)]
        for _, writer in held:  # both are served
            writer.write(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n")
        for reader, _ in held:
            assert (await _status_line(reader)).startswith(b"HTTP/1.1 200")
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        assert (await _status_line(reader)).startswith(b"HTTP/1.1 503")
        assert b"too many connections" in await reader.read()
        writer.close()
        for _, w in held:
            w.close()

    _run(RestLimits(max_connections=2), tmp_path, body)


def test_a_body_that_does_not_arrive_in_time_gets_408(tmp_path: Path) -> None:
    async def body(port: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(
            b"POST /v2/repository/index HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{"
        )
        assert (await _status_line(reader)).startswith(b"HTTP/1.1 408")
        writer.close()

    _run(RestLimits(read_timeout_s=0.2), tmp_path, body)


def test_a_request_head_that_never_completes_is_closed(tmp_path: Path) -> None:
    async def body(port: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n")  # no blank line
        assert await reader.read() == b""  # closed by the server, nothing answered
        writer.close()

    _run(RestLimits(idle_timeout_s=0.3), tmp_path, body)
