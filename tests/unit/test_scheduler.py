"""The scheduler with a fake executor on a manual clock: every request is
answered exactly once (result, error, expiry or cancellation), batches keep
their order when asked, and a failing or dying executor fails only what it
held."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Coroutine
from typing import Any

import numpy as np
import pytest
from sluice import _core
from sluice.errors import InternalError, SluiceError, UnavailableError
from sluice.executors.base import BatchOutcome
from sluice.monitoring.stats import InferStats
from sluice.proto import model_config_pb2 as mc
from sluice.scheduling.scheduler import Scheduler

MS = 1_000_000


def run_async(test: Callable[[], Coroutine[Any, Any, None]]) -> Callable[[], None]:
    """Runs an async test on a fresh event loop (no plugin needed)."""

    @functools.wraps(test)
    def wrapper() -> None:
        asyncio.run(test())

    return wrapper


class FakeExecutor:
    """Takes batches like the process executor (poll on the loop) and finishes
    them only when the test says so. Counts what it saw."""

    kind = "fake"

    def __init__(self, instances: int = 1, fail_notify: bool = False) -> None:
        self.instance_count = instances
        self.running: list[Any] = []  # batches handed out, not finished
        self.batches_seen = 0
        self.fail_notify = fail_notify
        self.available = True
        self.restarts = 0

    def attach(self, host: Scheduler, batcher: Any, loop: Any, output_names: list[str]) -> None:
        self.host, self.batcher = host, batcher

    def start(self) -> None:
        pass

    def close(self) -> None:
        pass

    def notify_enqueued(self) -> None:
        if self.fail_notify:
            raise RuntimeError("boom")
        self.pump()

    def pump(self) -> None:
        while len(self.running) < self.instance_count:
            batch, expired, _, _ = self.batcher.poll_batch()
            if expired:
                self.host.expire(expired)
            if batch is None:
                return
            self.batches_seen += 1
            self.running.append(batch)

    def finish(self, index: int = 0, error: SluiceError | None = None) -> None:
        """Completes a running batch: y = 2x for each request, or `error`."""
        batch = self.running.pop(index)
        ids = batch.ids
        tickets = self.host.take_tickets(ids)
        outputs = None
        if error is None:
            x = np.concatenate([t.feeds["x"] for t in tickets])
            outputs = self.host.split([2 * x], batch.rows, batch.total_rows)
        self.host.deliver(BatchOutcome(batch, ids, tickets, outputs, error, 0, 0, 0, 0))
        self.pump()

    async def stop(self) -> None:
        while self.running or self.host.queued_requests:
            self.pump()
            if self.running:
                self.finish()


def config(preserve_ordering: bool = False, timeout_ms: int = 0) -> mc.ModelConfig:
    c = mc.ModelConfig(name="m", max_batch_size=8)
    c.output.add(name="y")
    c.dynamic_batching.preserve_ordering = preserve_ordering
    if timeout_ms:
        c.dynamic_batching.default_queue_policy.default_timeout_microseconds = timeout_ms * 1000
    return c


def make(
    executor: FakeExecutor, cfg: mc.ModelConfig | None = None
) -> tuple[Scheduler, _core.ManualClock]:
    clock = _core.ManualClock(1_000 * MS)
    loop = asyncio.get_running_loop()
    s = Scheduler(
        "m", 1, cfg or config(), executor, 1, InferStats(detailed=False), loop, clock=clock
    )
    executor.attach(s, s.batcher, loop, s.output_names)
    return s, clock


def submit(s: Scheduler, value: float, rows: int = 1) -> asyncio.Task[Any]:
    x = np.full((rows, 1), value, dtype=np.float32)
    return asyncio.get_running_loop().create_task(s.submit({"x": x}, rows, 0))


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


@run_async
async def test_every_request_is_answered_once_with_its_own_rows() -> None:
    ex = FakeExecutor()
    s, _ = make(ex)
    tasks = [submit(s, float(i)) for i in range(20)]
    await settle()
    while ex.running:
        ex.finish()
        await settle()
    results = await asyncio.gather(*tasks)
    for i, r in enumerate(results):
        assert r.outputs["y"].tolist() == [[2.0 * i]]
    assert ex.batches_seen > 1  # requests queued behind a busy instance batched up
    assert not s._tickets  # nothing left behind


@run_async
async def test_cancelled_requests_leave_the_queue_and_never_resolve() -> None:
    ex = FakeExecutor()
    s, _ = make(ex)
    first = submit(s, 1.0)
    await settle()  # `first` runs; the next ones queue behind it
    queued = [submit(s, float(i)) for i in range(2, 6)]
    await settle()
    queued[1].cancel()
    await settle()
    assert s.queued_requests == 3
    ex.finish()
    await settle()
    ex.finish()
    await settle()
    assert (await first).outputs["y"].tolist() == [[2.0]]
    assert queued[1].cancelled()
    for i, t in enumerate(queued):
        if i != 1:
            assert (await t).outputs["y"].tolist() == [[2.0 * (i + 2)]]
    assert not s._tickets


@run_async
async def test_a_request_cancelled_while_its_batch_runs_is_not_answered_twice() -> None:
    ex = FakeExecutor()
    s, _ = make(ex)
    t = submit(s, 3.0)
    await settle()
    assert ex.running
    t.cancel()
    await settle()
    ex.finish()  # the batch comes back after its only request went away
    await settle()
    assert t.cancelled()
    assert not s._tickets


@run_async
async def test_preserve_ordering_holds_later_batches_back() -> None:
    ex = FakeExecutor(instances=2)
    s, _ = make(ex, config(preserve_ordering=True))
    a = submit(s, 1.0)
    await settle()
    b = submit(s, 2.0)
    await settle()
    assert len(ex.running) == 2
    ex.finish(index=1)  # b's batch finishes first ...
    await settle()
    assert not b.done()  # ... but waits for a's
    ex.finish(index=0)
    await settle()
    assert a.done()
    assert b.done()
    assert (await b).outputs["y"].tolist() == [[4.0]]


@run_async
async def test_an_executor_error_fails_only_its_batch() -> None:
    ex = FakeExecutor()
    s, _ = make(ex)
    a = submit(s, 1.0)
    await settle()
    b = submit(s, 2.0)
    await settle()
    ex.finish(error=UnavailableError("instance 0 died"))
    await settle()
    with pytest.raises(UnavailableError, match="died"):
        await a
    ex.finish()
    await settle()
    assert (await b).outputs["y"].tolist() == [[4.0]]


@run_async
async def test_an_executor_that_raises_on_enqueue_strands_nothing() -> None:
    ex = FakeExecutor(fail_notify=True)
    s, _ = make(ex)
    with pytest.raises(InternalError, match="executor failed"):
        await submit(s, 1.0)
    assert s.queued_requests == 0
    assert not s._tickets


@run_async
async def test_queued_requests_expire_on_the_manual_clock() -> None:
    ex = FakeExecutor()
    s, clock = make(ex, config(timeout_ms=5))
    a = submit(s, 1.0)
    await settle()  # a runs
    b = submit(s, 2.0)
    await settle()  # b queues
    clock.advance_ns(6 * MS)
    ex.finish()  # the next poll finds b expired
    await settle()
    assert (await a).outputs["y"].tolist() == [[2.0]]
    with pytest.raises(UnavailableError, match="timeout"):
        await b
    assert not s._tickets


@run_async
async def test_stop_drains_what_was_accepted() -> None:
    ex = FakeExecutor()
    s, _ = make(ex)
    tasks = [submit(s, float(i)) for i in range(5)]
    await settle()
    await s.stop()
    for i, t in enumerate(tasks):
        assert (await t).outputs["y"].tolist() == [[2.0 * i]]
    with pytest.raises(UnavailableError):
        await submit(s, 9.0)
