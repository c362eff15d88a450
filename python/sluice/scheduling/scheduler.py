"""Scheduler: one model version's requests through the C++ batcher to an executor.

Flow: `submit` (event loop) enqueues a ticket id in the core batcher and awaits
a Future, then tells the executor (sluice.executors) that work arrived. The
executor takes formed batches from the batcher, runs them on its instances and
hands each back once as a BatchOutcome to `deliver` on the loop, which answers
the batch's requests (in batch-formation order with preserve_ordering).

Exactly once: every accepted ticket is answered once: by its batch's result
or error, by expiry (timeout) or by cancellation, including while stopping,
when queued requests still drain through the executor.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

from sluice import _core
from sluice.errors import DeadlineExceededError, InternalError, SluiceError, from_code
from sluice.executors.base import BatchOutcome, Executor
from sluice.monitoring.drift import DriftMonitor
from sluice.monitoring.stats import InferStats
from sluice.proto import model_config_pb2 as mc
from sluice.scheduling.options import batcher_options

log = logging.getLogger(__name__)

Array = np.ndarray[Any, Any]


@dataclasses.dataclass
class ScheduledResult:
    outputs: dict[str, Array]  # every model output, this request's rows
    queue_ns: int
    compute_input_ns: int
    compute_infer_ns: int
    compute_output_ns: int  # splitting the batch's outputs (Triton's output copy)
    batch_size: int


@dataclasses.dataclass
class Ticket:
    future: asyncio.Future[ScheduledResult]
    feeds: dict[str, Array]
    rows: int
    deadline_binds: bool = False  # expiry means the client's deadline passed


class Scheduler:
    """Owns the batcher and the tickets of one model version; `executor` runs
    the batches. Loop-thread methods unless a docstring says otherwise."""

    def __init__(
        self,
        name: str,
        version: int,
        config: mc.ModelConfig,
        executor: Executor,
        intra_op_threads: int,
        stats: InferStats,
        loop: asyncio.AbstractEventLoop,
        drift: DriftMonitor | None = None,
        clock: _core.ManualClock | None = None,  # tests: the batcher's time
    ) -> None:
        self.label = f"'{name}' version {version}"
        self.loop = loop
        self._drift = drift
        self.observes = drift is not None
        self._stats = stats
        self._threads = intra_op_threads
        self._options = batcher_options(config, executor.instance_count)
        self.batcher = _core.Batcher(self._options, clock)
        self._split = config.max_batch_size > 0
        self.output_names = [o.name for o in config.output]
        self._tickets: dict[int, Ticket] = {}
        self._ids = itertools.count(1)
        # preserve_ordering: outcomes wait here until every earlier batch is out.
        self._next_sequence = 0
        self._held: dict[int, BatchOutcome] = {}
        self.executor = executor

    @property
    def queued_requests(self) -> int:
        return int(self.batcher.queued_requests)

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
        future: asyncio.Future[ScheduledResult] = self.loop.create_future()
        force = deadline_ns > 0
        timeout = timeout_ns
        if force:  # the client's deadline bounds the time in queue
            timeout = min(timeout_ns, deadline_ns) if timeout_ns > 0 else deadline_ns
        binds = force and timeout == deadline_ns
        self._tickets[ticket_id] = Ticket(future, feeds, rows, binds)
        try:
            # False when the request cannot change the batcher's decision (it
            # joins a run that waits for its delay): no executor needs to look.
            changed = self.batcher.enqueue(
                ticket_id, rows, shape_key & 0xFFFF_FFFF_FFFF_FFFF, priority, timeout, force
            )
        except _core.StatusError as exc:
            del self._tickets[ticket_id]
            raise from_code(*exc.args) from None
        except BaseException:
            # Anything else (a value the binding cannot convert) must not leave
            # the ticket and its inputs behind.
            del self._tickets[ticket_id]
            raise
        try:
            if changed:
                self.executor.notify_enqueued()
        except Exception as exc:
            # A broken executor must not strand the request in the queue.
            if self.batcher.cancel(ticket_id):
                self._tickets.pop(ticket_id, None)
            raise InternalError(f"model {self.label}: the executor failed: {exc}") from exc
        try:
            return await future
        except asyncio.CancelledError:
            # The client went away: drop it from the queue if it is still there.
            if self.batcher.cancel(ticket_id):
                self._tickets.pop(ticket_id, None)
            raise

    def expire(self, expired: Sequence[tuple[int, str, str]]) -> None:
        for ticket_id, code, message in expired:
            ticket = self._tickets.pop(ticket_id, None)
            if ticket is None or ticket.future.done():
                continue
            if ticket.deadline_binds and code == "unavailable":
                error: SluiceError = DeadlineExceededError(
                    f"deadline exceeded after waiting in the queue of model {self.label}"
                )
            else:
                error = from_code(code, message)
            ticket.future.set_exception(error)

    def deliver(self, outcome: BatchOutcome) -> None:
        if not self._options.preserve_ordering:
            self._resolve(outcome)
            return
        self._held[int(outcome.batch.sequence)] = outcome
        while self._next_sequence in self._held:
            self._resolve(self._held.pop(self._next_sequence))
            self._next_sequence += 1

    def _resolve(self, o: BatchOutcome) -> None:
        batch = o.batch
        total_rows = int(batch.total_rows)
        compute_input_ns = o.infer_start_ns - o.compute_start_ns
        compute_infer_ns = o.infer_end_ns - o.infer_start_ns
        compute_output_ns = o.outputs_ready_ns - o.infer_end_ns
        if o.error is None:
            self._stats.record_execution(
                batch_size=total_rows,
                compute_input_ns=compute_input_ns,
                compute_infer_ns=compute_infer_ns,
                compute_output_ns=compute_output_ns,
                threads=self._threads,
            )
        formed_ns = int(batch.formed_ns)
        enqueued = batch.enqueued_ns  # one copy, not one per request
        tickets = self._tickets
        for i, (ticket_id, ticket) in enumerate(zip(o.ids, o.tickets, strict=True)):
            tickets.pop(ticket_id, None)
            if ticket.future.done():  # cancelled while its batch ran
                continue
            if o.error is not None:
                ticket.future.set_exception(o.error)
                continue
            assert o.outputs is not None
            ticket.future.set_result(
                ScheduledResult(
                    outputs=o.outputs[i],
                    queue_ns=formed_ns - enqueued[i],
                    compute_input_ns=compute_input_ns,
                    compute_infer_ns=compute_infer_ns,
                    compute_output_ns=compute_output_ns,
                    batch_size=total_rows,
                )
            )

    async def stop(self) -> None:
        """Refuses new requests, lets the executor drain the queue, releases it."""
        self.batcher.stop()
        await self.executor.stop()

    # ---- any thread ------------------------------------------------------------

    def take_tickets(self, ids: Sequence[int]) -> list[Ticket]:
        return [self._tickets[i] for i in ids]

    def record_execution(self, rows: int, infer_ns: int) -> None:
        self.batcher.record_execution(rows, infer_ns)

    def observe(self, outcome: BatchOutcome) -> None:
        """Feeds the drift windows with a delivered batch (never on the
        response's path: executors call it after delivery)."""
        if self._drift is not None and outcome.results is not None and outcome.feeds is not None:
            self._drift.observe(outcome.feeds, outcome.results)
        outcome.feeds = outcome.results = None

    def split(
        self, results: list[Array], rows: list[int], total_rows: int
    ) -> list[dict[str, Array]]:
        """The batch's outputs as per-request views (no copy)."""
        names = self.output_names
        if len(rows) == 1 or not self._split:
            return [dict(zip(names, results, strict=True))]
        for name, arr in zip(names, results, strict=True):
            if arr.ndim == 0 or arr.shape[0] != total_rows:
                raise InternalError(
                    f"model {self.label}: output '{name}' has shape {list(arr.shape)}, whose "
                    f"first dim should be the batch's {total_rows} rows"
                )
        per_request: list[dict[str, Array]] = []
        offset = 0
        for n in rows:
            per_request.append(
                {name: arr[offset : offset + n] for name, arr in zip(names, results, strict=True)}
            )
            offset += n
        return per_request


def gather(tickets: Sequence[Ticket], total_rows: int) -> dict[str, Array]:
    """The batch's inputs as contiguous arrays (C++ memcpy for numeric ones)."""
    if len(tickets) == 1:
        return tickets[0].feeds
    feeds: dict[str, Array] = {}
    for name, first in tickets[0].feeds.items():
        parts = [t.feeds[name] for t in tickets]
        if first.dtype == object:
            feeds[name] = np.concatenate(parts)
            continue
        out = np.empty((total_rows, *first.shape[1:]), dtype=first.dtype)
        _core.gather_rows([as_bytes(p) for p in parts], as_bytes(out))
        feeds[name] = out
    return feeds


def as_bytes(arr: Array) -> Array:
    """A C-contiguous array's bytes as uint8, for the core's copy: dtypes that
    numpy cannot export through the buffer protocol (bfloat16) copy as bytes."""
    return np.ascontiguousarray(arr).reshape(-1).view(np.uint8)
