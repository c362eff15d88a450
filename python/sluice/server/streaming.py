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
    # The queue holds each request's task: in arrival order (ordered; the writer
    # awaits them in turn), or as each finishes (unordered).
    queue: asyncio.Queue[asyncio.Task[Reply] | None] = asyncio.Queue()
    slots = asyncio.Semaphore(window)
    pending: set[asyncio.Task[Reply]] = set()

    def finished(task: asyncio.Task[Reply]) -> None:
        pending.discard(task)
        if not ordered and not task.cancelled():
            queue.put_nowait(task)

    async def read() -> None:
        try:
            async for request in requests:
                await slots.acquire()  # released once its reply is written
                task = asyncio.create_task(one(request))
                pending.add(task)
                task.add_done_callback(finished)
                if ordered:
                    queue.put_nowait(task)
            if pending and not ordered:
                await asyncio.wait(set(pending))
        finally:
            queue.put_nowait(None)  # whatever happened, the writer ends

    reader = asyncio.create_task(read())
    try:
        while (item := await queue.get()) is not None:
            yield await item
            slots.release()
        await reader  # surface a reader failure (a broken request stream)
    finally:
        reader.cancel()
        for task in list(pending):
            task.cancel()
