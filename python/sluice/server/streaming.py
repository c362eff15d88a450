"""ModelStreamInfer's flow control, shared by the in-process servicer and the
frontend processes (which see messages as bytes).

- Requests on one stream run concurrently.
- Replies go back as they finish (clients match them by request id, as with
  Triton), or in request order when the client asks for it with the
  `sluice-stream-order: request` header at stream start.
- At most `window` requests per stream are in flight or answered but not yet
  taken by the transport: past that the stream stops reading requests, so a
  client that sends faster than the model serves (or never reads) is held
  back by HTTP/2 flow control instead of growing the server's memory.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable
from typing import Any, TypeVar

# Unanswered requests per stream (in flight or waiting to be written).
STREAM_WINDOW = 256
# gRPC metadata (lower case) a client sends at stream start to get its replies
# in request order; any other value, or none, means completion order.
ORDER_HEADER = "sluice-stream-order"
ORDER_REQUEST = "request"

Req = TypeVar("Req")
Reply = TypeVar("Reply")


def wants_request_order(metadata: Iterable[tuple[str, str | bytes]] | None) -> bool:
    return any(k == ORDER_HEADER and v == ORDER_REQUEST for k, v in metadata or ())


async def stream_replies(
    requests: AsyncIterator[Req],
    one: Callable[[Req], Coroutine[Any, Any, Reply]],
    *,
    ordered: bool,
    window: int = STREAM_WINDOW,
) -> AsyncIterator[Reply]:
    """Yields one reply per request. `one` must turn every failure into a reply
    (errors travel in-band per message); it never raises but for cancellation."""
    loop = asyncio.get_running_loop()
    # Each request's task: in arrival order (ordered; the writer awaits them in
    # turn), or as each finishes (unordered). None marks the end of requests.
    # A deque and one waiter each way, not asyncio.Queue and Semaphore: this
    # runs once per message, and their bookkeeping cost more than the rest of it.
    ready: deque[asyncio.Task[Reply] | None] = deque()
    pending: set[asyncio.Task[Reply]] = set()
    unanswered = 0  # taken from the stream, reply not yet taken by the transport
    writer_waits: asyncio.Future[None] | None = None
    reader_waits: asyncio.Future[None] | None = None

    def wake_writer() -> None:
        nonlocal writer_waits
        if writer_waits is not None and not writer_waits.done():
            writer_waits.set_result(None)
        writer_waits = None

    def finished(task: asyncio.Task[Reply]) -> None:
        pending.discard(task)
        if not ordered and not task.cancelled():
            ready.append(task)
            wake_writer()

    async def read() -> None:
        nonlocal unanswered, reader_waits
        try:
            async for request in requests:
                while unanswered >= window:  # back-pressure: stop reading
                    reader_waits = loop.create_future()
                    await reader_waits
                unanswered += 1
                task = loop.create_task(one(request))
                pending.add(task)
                task.add_done_callback(finished)
                if ordered:
                    ready.append(task)
                    wake_writer()
            if pending and not ordered:
                await asyncio.wait(set(pending))
        finally:
            ready.append(None)  # whatever happened, the writer ends
            wake_writer()

    reader = loop.create_task(read())
    try:
        while True:
            if not ready:
                writer_waits = loop.create_future()
                await writer_waits
                continue
            item = ready.popleft()
            if item is None:
                break
            yield await item
            # The transport took the reply: its slot frees.
            unanswered -= 1
            if reader_waits is not None and not reader_waits.done():
                reader_waits.set_result(None)
        await reader  # surface a reader failure (a broken request stream)
    finally:
        reader.cancel()
        for task in list(pending):
            task.cancel()
