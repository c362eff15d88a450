"""Scheduler: one model version's requests through the C++ batcher to its instances.

Flow: `submit` (event loop) enqueues a ticket id in the core batcher and awaits
a Future. Instance worker threads block in `next_batch()` with the GIL
released, gather the batch's inputs into contiguous buffers (C++ memcpy; the
GIL is released only for copies of 256 KiB or more, since getting it back from a
busy event loop costs more than a small copy), run onnxruntime (no GIL), split
outputs into per-request views, and resolve the whole batch with ONE
`call_soon_threadsafe`.

Exactly once: every accepted ticket is answered once: by its batch's result
or error, by expiry (timeout) or by cancellation, including while stopping,
when queued requests still drain through the workers.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import threading
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from sluice import _core
from sluice.errors import DeadlineExceededError, InternalError, SluiceError, from_code
from sluice.monitoring.drift import DriftMonitor
from sluice.monitoring.stats import InferStats
from sluice.proto import model_config_pb2 as mc
from sluice.runtime import ModelRuntime
from sluice.scheduling.options import batcher_options

log = logging.getLogger(__name__)

Array = np.ndarray[Any, Any]

TIMER_SLACK_NS = 1_000


@dataclasses.dataclass
class ScheduledResult:
    outputs: dict[str, Array]  # every model output, this request's rows
    queue_ns: int
    compute_input_ns: int
    compute_infer_ns: int
    compute_output_ns: int  # splitting the batch's outputs (Triton's output copy)
    batch_size: int


@dataclasses.dataclass
class _Ticket:
    future: asyncio.Future[ScheduledResult]
    feeds: dict[str, Array]
    rows: int
    deadline_binds: bool = False  # expiry means the client's deadline passed


@dataclasses.dataclass
class _BatchOutcome:
    batch: Any  # _core.Batch
    tickets: list[_Ticket]
    outputs: list[dict[str, Array]] | None
    error: SluiceError | None
    compute_start_ns: int
    infer_start_ns: int
    infer_end_ns: int
    outputs_ready_ns: int  # the batch's outputs split per request, before the hop to the loop
    # The batch's contiguous inputs and the model's outputs, for the drift
    # monitor (which runs after the outcome was posted).
    feeds: dict[str, Array] | None = None
    results: list[Array] | None = None


class Scheduler:
    def __init__(
        self,
        name: str,
        version: int,
        config: mc.ModelConfig,
        runtime: ModelRuntime,
        stats: InferStats,
        loop: asyncio.AbstractEventLoop,
        drift: DriftMonitor | None = None,
    ) -> None:
        self._drift = drift
        self._label = f"'{name}' version {version}"
        self._runtime = runtime
        self._stats = stats
        self._loop = loop
        self._options = batcher_options(config, runtime.instance_count)
        self._batcher = _core.Batcher(self._options)
        self._split = config.max_batch_size > 0
        self._output_names = [o.name for o in config.output]
        self._tickets: dict[int, _Ticket] = {}
        self._ids = itertools.count(1)
        # preserve_ordering: outcomes wait here until every earlier batch is out.
        self._next_sequence = 0
        self._held: dict[int, _BatchOutcome] = {}
        self._workers = [
            threading.Thread(target=self._work, name=f"sluice-{name}-v{version}-i{i}", daemon=True)
            for i in range(runtime.instance_count)
        ]
        for w in self._workers:
            w.start()

    @property
    def queued_requests(self) -> int:
        return int(self._batcher.queued_requests)

    # ---- event-loop side ----------------------------------------------------

    async def submit(
        self,
        feeds: dict[str, Array],
        rows: int,
        shape_key: int,
        priority: int = 0,
        timeout_ns: int = 0,
        deadline_ns: int = 0,
    ) -> ScheduledResult:
        """Queues one request and waits for its rows of every output. Raises the
        batcher's refusal (queue full, SLO, stopping) or the batch's error."""
        ticket_id = next(self._ids)
        future: asyncio.Future[ScheduledResult] = self._loop.create_future()
        force = deadline_ns > 0
        timeout = timeout_ns
        if force:  # the client's deadline bounds the time in queue
            timeout = min(timeout_ns, deadline_ns) if timeout_ns > 0 else deadline_ns
        binds = force and timeout == deadline_ns
        self._tickets[ticket_id] = _Ticket(future, feeds, rows, binds)
        try:
            self._batcher.enqueue(
                ticket_id, rows, shape_key & 0xFFFF_FFFF_FFFF_FFFF, priority, timeout, force
            )
        except _core.StatusError as exc:
            del self._tickets[ticket_id]
            raise from_code(*exc.args) from None
        except BaseException:
            # Any other refusal (e.g. a value the binding cannot hold): the ticket
            # must not outlive a failed enqueue, or it keeps its inputs forever.
            del self._tickets[ticket_id]
            raise
        try:
            return await future
        except asyncio.CancelledError:
            # The client went away: drop it from the queue if it is still there.
            if self._batcher.cancel(ticket_id):
                self._tickets.pop(ticket_id, None)
            raise

    def _expire(self, expired: Sequence[tuple[int, str, str]]) -> None:
        for ticket_id, code, message in expired:
            ticket = self._tickets.pop(ticket_id, None)
            if ticket is None or ticket.future.done():
                continue
            if ticket.deadline_binds and code == "unavailable":
                error: SluiceError = DeadlineExceededError(
                    f"deadline exceeded after waiting in the queue of model {self._label}"
                )
            else:
                error = from_code(code, message)
            ticket.future.set_exception(error)

    def _deliver(self, outcome: _BatchOutcome) -> None:
        if not self._options.preserve_ordering:
            self._resolve(outcome)
            return
        self._held[int(outcome.batch.sequence)] = outcome
        while self._next_sequence in self._held:
            self._resolve(self._held.pop(self._next_sequence))
            self._next_sequence += 1

    def _resolve(self, o: _BatchOutcome) -> None:
        batch = o.batch
        if o.error is None:
            self._stats.record_execution(
                batch_size=int(batch.total_rows),
                compute_input_ns=o.infer_start_ns - o.compute_start_ns,
                compute_infer_ns=o.infer_end_ns - o.infer_start_ns,
                compute_output_ns=o.outputs_ready_ns - o.infer_end_ns,
                threads=self._runtime.intra_op_threads,
            )
        for i, (ticket_id, ticket) in enumerate(zip(batch.ids, o.tickets, strict=True)):
            self._tickets.pop(ticket_id, None)
            if ticket.future.done():  # cancelled while its batch ran
                continue
            if o.error is not None:
                ticket.future.set_exception(o.error)
                continue
            assert o.outputs is not None
            ticket.future.set_result(
                ScheduledResult(
                    outputs=o.outputs[i],
                    queue_ns=int(batch.formed_ns) - int(batch.enqueued_ns[i]),
                    compute_input_ns=o.infer_start_ns - o.compute_start_ns,
                    compute_infer_ns=o.infer_end_ns - o.infer_start_ns,
                    compute_output_ns=o.outputs_ready_ns - o.infer_end_ns,
                    batch_size=int(batch.total_rows),
                )
            )

    async def stop(self) -> None:
        """Refuses new requests, lets the workers drain the queue, joins them."""
        self._batcher.stop()
        await asyncio.to_thread(self._join)

    def _join(self) -> None:
        for w in self._workers:
            w.join()

    # ---- worker side ----------------------------------------------------------

    def _post(self, callback: Callable[..., None], *args: Any) -> None:
        try:
            self._loop.call_soon_threadsafe(callback, *args)
        except RuntimeError:  # loop closed: the process is exiting
            log.warning("model %s: event loop closed; dropping a completion", self._label)

    def _work(self) -> None:
        # Queue-delay waits end on time instead of up to 50 us late (Linux's default slack).
        _core.set_timer_slack_ns(TIMER_SLACK_NS)
        while True:
            got = self._batcher.next_batch()
            if got is None:
                return  # stopped and drained
            batch, expired = got
            if expired:
                self._post(self._expire, expired)
            if batch is not None:
                # _run turns every failure into the batch's outcome, so each
                # batch is answered once and preserve_ordering never stalls.
                outcome = self._run(batch)
                self._post(self._deliver, outcome)
                # Drift windows after the results went back: the client's
                # response never waits for them.
                if self._drift is not None and outcome.results is not None:
                    assert outcome.feeds is not None
                    self._drift.observe(outcome.feeds, outcome.results)
                    outcome.feeds = outcome.results = None

    def _run(self, batch: Any) -> _BatchOutcome:
        compute_start = _core.monotonic_ns()
        tickets = [self._tickets[i] for i in batch.ids]
        infer_start = infer_end = compute_start
        feeds: dict[str, Array] | None = None
        results: list[Array] | None = None
        try:
            feeds = self._gather(tickets, int(batch.total_rows))
            infer_start = _core.monotonic_ns()
            results = self._runtime.run(feeds, self._output_names)
            infer_end = _core.monotonic_ns()
            self._batcher.record_execution(int(batch.total_rows), infer_end - infer_start)
            outputs = self._scatter(results, [t.rows for t in tickets], int(batch.total_rows))
            error = None
        except SluiceError as exc:
            outputs, error = None, exc
        except Exception as exc:  # the model failed on this batch only
            outputs = None
            error = InternalError(f"onnxruntime failed to run model {self._label}: {exc}")
        if error is not None:
            results = None
        return _BatchOutcome(
            batch,
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

    def _gather(self, tickets: list[_Ticket], total_rows: int) -> dict[str, Array]:
        if len(tickets) == 1:
            return tickets[0].feeds
        feeds: dict[str, Array] = {}
        for name, first in tickets[0].feeds.items():
            parts = [t.feeds[name] for t in tickets]
            if first.dtype == object:
                feeds[name] = np.concatenate(parts)
                continue
            out = np.empty((total_rows, *first.shape[1:]), dtype=first.dtype)
            _core.gather_rows([np.ascontiguousarray(p) for p in parts], out)
            feeds[name] = out
        return feeds

    def _scatter(
        self, results: list[Array], rows: list[int], total_rows: int
    ) -> list[dict[str, Array]]:
        if len(rows) == 1 or not self._split:
            return [dict(zip(self._output_names, results, strict=True))]
        for name, arr in zip(self._output_names, results, strict=True):
            if arr.ndim == 0 or arr.shape[0] != total_rows:
                raise InternalError(
                    f"model {self._label}: output '{name}' has shape {list(arr.shape)}, whose "
                    f"first dim should be the batch's {total_rows} rows"
                )
        per_request: list[dict[str, Array]] = []
        offset = 0
        for n in rows:
            per_request.append(
                {
                    name: arr[offset : offset + n]
                    for name, arr in zip(self._output_names, results, strict=True)
                }
            )
            offset += n
        return per_request
