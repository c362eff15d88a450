"""Stream flow control (server/streaming.py) and the frontend wire's framing
(server/frontend_wire.py), on a real event loop with no server."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from typing import Any

import pytest
from sluice.server import frontend_wire as wire
from sluice.server.streaming import stream_replies, wants_request_order


async def _source(items: list[int], pulled: list[int]) -> AsyncIterator[int]:
    for i in items:
        pulled.append(i)
        yield i


async def _settle() -> None:
    """Lets every ready task run (steps of the loop, not an amount of time)."""
    for _ in range(100):
        await asyncio.sleep(0)


def test_request_order_when_asked_completion_order_otherwise() -> None:
    async def main(ordered: bool) -> list[int]:
        gates = {i: asyncio.Event() for i in range(20)}

        async def one(i: int) -> int:
            await gates[i].wait()
            return i

        replies: list[int] = []

        async def consume() -> None:
            async for reply in stream_replies(_source(list(range(20)), []), one, ordered=ordered):
                replies.append(reply)

        consumer = asyncio.create_task(consume())
        await _settle()
        for i in reversed(range(20)):  # the last request finishes first
            gates[i].set()
            await _settle()
        await consumer
        return replies

    assert asyncio.run(main(ordered=True)) == list(range(20))
    assert asyncio.run(main(ordered=False)) == list(reversed(range(20)))


def test_the_window_stops_reading_until_replies_are_taken() -> None:
    async def main() -> None:
        release = asyncio.Event()
        pulled: list[int] = []

        async def one(i: int) -> int:
            await release.wait()
            return i

        replies = stream_replies(_source(list(range(100)), pulled), one, ordered=False, window=4)
        first = asyncio.create_task(anext(replies))
        await _settle()
        # Four in flight, the fifth read and waiting for a slot; nothing more.
        assert len(pulled) == 5
        release.set()
        got = [await first] + [r async for r in replies]
        assert sorted(got) == list(range(100))

    asyncio.run(main())


def test_a_failing_reply_ends_the_stream_with_its_error() -> None:
    async def main(ordered: bool) -> None:
        async def one(i: int) -> int:
            if i == 3:
                raise RuntimeError("broken reply")
            return i

        with pytest.raises(RuntimeError, match="broken reply"):
            async for _ in stream_replies(_source(list(range(10)), []), one, ordered=ordered):
                pass

    asyncio.run(main(True))
    asyncio.run(main(False))


def test_order_header() -> None:
    assert wants_request_order([("sluice-stream-order", "request")])
    assert not wants_request_order([("sluice-stream-order", "completion")])
    assert not wants_request_order(None)


class _Transport:
    def __init__(self) -> None:
        self.closed = False

    def close(self) -> None:
        self.closed = True


class _Frames(wire.FrameProtocol):
    def __init__(self, max_body_bytes: int) -> None:
        super().__init__(max_body_bytes)
        self.frames: list[tuple[int, int, int, float, bytes]] = []

    def frame_received(
        self, call_id: int, kind: int, code: int, seconds: float, body: bytes
    ) -> None:
        self.frames.append((call_id, kind, code, seconds, body))


def test_frames_survive_any_split_of_the_byte_stream() -> None:
    rng = random.Random(3)
    sent = [
        (i, wire.CALL, i % 7, float(i) / 3, bytes(rng.randrange(256) for _ in range(i * 37 % 300)))
        for i in range(200)
    ]
    data = b"".join(
        wire.HEADER.pack(len(body), call_id, kind, code, seconds) + body
        for call_id, kind, code, seconds, body in sent
    )
    protocol = _Frames(max_body_bytes=1024)
    transport: Any = _Transport()
    protocol.connection_made(transport)
    pos = 0
    while pos < len(data):
        step = rng.choice((1, 2, 19, 20, 64, 500, 4096))
        protocol.data_received(data[pos : pos + step])
        pos += step
    assert protocol.frames == sent
    assert not transport.closed


def test_an_oversized_frame_closes_the_connection() -> None:
    protocol = _Frames(max_body_bytes=16)
    transport: Any = _Transport()
    protocol.connection_made(transport)
    protocol.data_received(wire.HEADER.pack(17, 1, wire.CALL, 0, -1.0) + b"x" * 17)
    assert transport.closed
    assert protocol.frames == []
