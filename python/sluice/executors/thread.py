"""The thread executor: instance worker threads inside the server process.

Each worker blocks in the batcher's next_batch() with the GIL released,
gathers the batch's inputs (C++ memcpy), runs onnxruntime (which releases the
GIL), splits outputs into per-request views and hands the outcome to the
loop with ONE call_soon_threadsafe. Cheap hand-offs, but each one needs the
GIL, which a busy event loop holds most of the time.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from typing import Any

from sluice import _core
from sluice.errors import InternalError, SluiceError
from sluice.executors.base import THREAD, BatchOutcome, ExecutorHost
from sluice.runtime import ModelRuntime
from sluice.scheduling.scheduler import gather

log = logging.getLogger(__name__)

TIMER_SLACK_NS = 1_000


class ThreadExecutor:
    kind = THREAD

    def __init__(self, runtime: ModelRuntime) -> None:
        self._runtime = runtime
        self.instance_count = runtime.instance_count
        self._workers: list[threading.Thread] = []
        self._host: ExecutorHost | None = None
        self._batcher: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._output_names: list[str] = []

    def attach(
        self,
        host: ExecutorHost,
        batcher: Any,
        loop: asyncio.AbstractEventLoop,
        output_names: list[str],
    ) -> None:
        """Starts the workers (from any thread; they only wait until work comes)."""
        self._host, self._batcher, self._loop = host, batcher, loop
        self._output_names = output_names
        label = host.label.replace("'", "").replace(" version ", "-v")
        self._workers = [
            threading.Thread(target=self._work, name=f"sluice-{label}-i{i}", daemon=True)
            for i in range(self.instance_count)
        ]
        for w in self._workers:
            w.start()

    def start(self) -> None:
        pass  # the workers already wait in next_batch()

    def close(self) -> None:
        pass  # nothing runs before attach(); afterwards stop() drains

    def notify_enqueued(self) -> None:
        pass  # the batcher's condition variable wakes a waiting worker

    @property
    def restarts(self) -> int:
        return 0  # a thread cannot die on its own: failures become batch errors

    @property
    def available(self) -> bool:
        return True

    async def stop(self) -> None:
        await asyncio.to_thread(self._join)

    def _join(self) -> None:
        for w in self._workers:
            w.join()

    # ---- worker side ----------------------------------------------------------

    def _post(self, callback: Callable[..., None], *args: Any) -> None:
        assert self._loop is not None
        try:
            self._loop.call_soon_threadsafe(callback, *args)
        except RuntimeError:  # loop closed: the process is exiting
            log.warning("event loop closed; dropping a completion")

    def _work(self) -> None:
        host = self._host
        assert host is not None
        # Queue-delay waits end on time instead of up to 50 us late (Linux's default slack).
        _core.set_timer_slack_ns(TIMER_SLACK_NS)
        while True:
            got = self._batcher.next_batch()
            if got is None:
                return  # stopped and drained
            batch, expired = got
            if expired:
                self._post(host.expire, expired)
            if batch is not None:
                # _run turns every failure into the batch's outcome, so each
                # batch is answered once and preserve_ordering never stalls.
                outcome = self._run(host, batch)
                self._post(host.deliver, outcome)
                # Drift windows after the results went back: the client's
                # response never waits for them.
                host.observe(outcome)
                # Not held while waiting for the next batch: the batch's inputs
                # and outputs are the size of its requests' payloads.
                del outcome
            del got, batch, expired

    def _run(self, host: ExecutorHost, batch: Any) -> BatchOutcome:
        compute_start = _core.monotonic_ns()
        ids = batch.ids
        rows = batch.rows
        total_rows = int(batch.total_rows)
        tickets = host.take_tickets(ids)
        infer_start = infer_end = compute_start
        feeds = None
        results = None
        outputs = None
        error: SluiceError | None = None
        try:
            feeds = gather(tickets, total_rows)
            infer_start = _core.monotonic_ns()
            results = self._runtime.run(feeds, self._output_names)
            infer_end = _core.monotonic_ns()
            host.record_execution(total_rows, infer_end - infer_start)
            outputs = host.split(results, rows, total_rows)
        except SluiceError as exc:
            error = exc
        except Exception as exc:  # the model failed on this batch only
            error = InternalError(f"onnxruntime failed to run model {host.label}: {exc}")
        if error is not None:
            results = None
        return BatchOutcome(
            batch,
            ids,
            tickets,
            outputs,
            error,
            compute_start,
            infer_start,
            infer_end,
            _core.monotonic_ns(),
            feeds,
            results,
        )
