"""The C++ dynamic batcher through its bindings, on an injected clock.

Time only moves when a test moves it (ManualClock + try_next_batch), so delays
and timeouts are checked exactly, without sleeping.
"""

from __future__ import annotations

import ctypes
import resource
import sys
import threading

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sluice import _core

US = 1_000
MS = 1_000_000


def make(
    max_batch: int = 8,
    delay_us: int = 0,
    clock: _core.ManualClock | None = None,
    **fields: object,
) -> tuple[_core.Batcher, _core.ManualClock]:
    o = _core.BatcherOptions()
    o.max_batch_size = max_batch
    o.max_queue_delay_ns = delay_us * US
    for k, v in fields.items():
        setattr(o, k, v)
    clock = clock or _core.ManualClock(1_000 * MS)
    return _core.Batcher(o, clock), clock


def take(b: _core.Batcher) -> tuple[list[int], list[tuple[int, str, str]]]:
    got = b.try_next_batch()
    assert got is not None
    batch, expired = got
    return (list(batch.ids) if batch is not None else []), list(expired)


def test_batch_never_exceeds_max_and_counts_rows() -> None:
    b, _ = make(max_batch=8)
    for i, rows in enumerate([3, 3, 3, 1], start=1):
        b.enqueue(i, rows, 0)
    assert take(b)[0] == [1, 2]  # 3 + 3 = 6; adding 3 more would be 9 > 8
    assert take(b)[0] == [3, 4]
    assert b.queued_requests == 0


def test_request_larger_than_max_is_invalid() -> None:
    b, _ = make(max_batch=4)
    with pytest.raises(_core.StatusError) as info:
        b.enqueue(1, 5, 0)
    assert info.value.args[0] == "invalid_argument"


def test_delay_is_respected_exactly() -> None:
    b, clock = make(max_batch=8, delay_us=500)
    b.enqueue(1, 1, 0)
    clock.advance_ns(499 * US)
    assert take(b) == ([], [])
    clock.advance_ns(1 * US)
    assert take(b)[0] == [1]


def test_full_batch_dispatches_before_the_delay() -> None:
    b, _ = make(max_batch=4, delay_us=10_000)
    for i in range(1, 5):
        b.enqueue(i, 1, 0)
    assert take(b)[0] == [1, 2, 3, 4]


def test_preferred_size_dispatches_when_reached() -> None:
    b, _ = make(max_batch=8, delay_us=10_000, preferred_batch_sizes=[2])
    b.enqueue(1, 1, 0)
    assert take(b) == ([], [])
    b.enqueue(2, 1, 0)
    assert take(b)[0] == [1, 2]


def test_shapes_never_mix_and_order_is_kept() -> None:
    b, _ = make(max_batch=8)
    b.enqueue(1, 1, 111)
    b.enqueue(2, 1, 111)
    b.enqueue(3, 1, 222)
    b.enqueue(4, 1, 111)
    assert take(b)[0] == [1, 2]
    assert take(b)[0] == [3]
    assert take(b)[0] == [4]


def test_higher_priority_first() -> None:
    b, _ = make(max_batch=1, priority_levels=3, default_priority_level=2)
    b.enqueue(1, 1, 0, priority=3)
    b.enqueue(2, 1, 0)  # default level 2
    b.enqueue(3, 1, 0, priority=1)
    assert [take(b)[0] for _ in range(3)] == [[3], [2], [1]]


def test_queue_cap_per_priority_level() -> None:
    low = _core.QueuePolicy()
    low.max_queue_size = 2
    b, _ = make(max_batch=1, priority_levels=2, priority_queue_policy={2: low})
    b.enqueue(1, 1, 0, priority=2)
    b.enqueue(2, 1, 0, priority=2)
    with pytest.raises(_core.StatusError) as info:
        b.enqueue(3, 1, 0, priority=2)
    assert info.value.args[0] == "resource_exhausted"
    assert "exceeds maximum queue size" in info.value.args[1]
    b.enqueue(4, 1, 0, priority=1)  # level 1 has no cap


def test_timeout_reject_expires_with_unavailable() -> None:
    policy = _core.QueuePolicy()
    policy.default_timeout_ns = 100 * US
    b, clock = make(max_batch=8, delay_us=1_000, default_queue_policy=policy)
    b.enqueue(1, 1, 0)
    clock.advance_ns(101 * US)
    ids, expired = take(b)
    assert ids == []
    assert expired == [(1, "unavailable", "request timeout expired")]


def test_timeout_delay_moves_request_behind_others() -> None:
    policy = _core.QueuePolicy()
    policy.default_timeout_ns = 100 * US
    policy.timeout_action = _core.TimeoutAction.DELAY
    b, clock = make(max_batch=1, default_queue_policy=policy)
    b.enqueue(1, 1, 0)
    b.enqueue(2, 1, 0)
    clock.advance_ns(150 * US)
    b.enqueue(3, 1, 0)  # fresh, not timed out
    assert [take(b)[0] for _ in range(3)] == [[3], [1], [2]]


def test_request_timeout_needs_override_but_deadlines_always_apply() -> None:
    b, clock = make(max_batch=8, delay_us=10_000)
    b.enqueue(1, 1, 0, timeout_ns=50 * US)  # ignored: no allow_timeout_override
    b.enqueue(2, 1, 0, timeout_ns=50 * US, force_timeout=True)  # a client deadline
    clock.advance_ns(60 * US)
    _, expired = take(b)
    assert [e[0] for e in expired] == [2]
    clock.advance_ns(10_000 * US)
    assert take(b)[0] == [1]


def test_cancel_once() -> None:
    b, _ = make(max_batch=8, delay_us=1_000)
    b.enqueue(1, 1, 0)
    assert b.cancel(1)
    assert not b.cancel(1)
    assert b.queued_requests == 0


def test_stop_refuses_new_and_drains_queued() -> None:
    b, _ = make(max_batch=2, delay_us=1_000_000)
    for i in range(1, 4):
        b.enqueue(i, 1, 0)
    b.stop()
    with pytest.raises(_core.StatusError) as info:
        b.enqueue(9, 1, 0)
    assert info.value.args[0] == "unavailable"
    drained = []
    while (got := b.next_batch()) is not None:
        batch, _ = got
        if batch is not None:
            drained.extend(batch.ids)
    assert drained == [1, 2, 3]


def test_without_batching_each_request_runs_alone() -> None:
    b, _ = make(max_batch=8, batching=False)
    b.enqueue(1, 2, 0)
    b.enqueue(2, 2, 0)
    assert take(b)[0] == [1]
    assert take(b)[0] == [2]


def test_sequence_numbers_follow_formation_order() -> None:
    b, _ = make(max_batch=1)
    for i in range(1, 4):
        b.enqueue(i, 1, 0)
    seqs = []
    for _ in range(3):
        got = b.try_next_batch()
        assert got is not None
        assert got[0] is not None
        seqs.append(got[0].sequence)
    assert seqs == [0, 1, 2]


@settings(max_examples=60, deadline=None)
@given(
    ops=st.lists(
        st.tuples(
            st.sampled_from(["enq", "take", "cancel", "tick"]),
            st.integers(1, 4),
            st.integers(0, 2),
        ),
        max_size=80,
    ),
    max_batch=st.integers(1, 6),
    delay_us=st.sampled_from([0, 50, 200]),
)
def test_exactly_once_property(
    ops: list[tuple[str, int, int]], max_batch: int, delay_us: int
) -> None:
    """Every accepted request leaves exactly once: batch, expiry or cancel."""
    policy = _core.QueuePolicy()
    policy.default_timeout_ns = 300 * US
    b, clock = make(max_batch=max_batch, delay_us=delay_us, default_queue_policy=policy)
    accepted: set[int] = set()
    out: list[int] = []
    next_id = 1
    for op, rows, key in ops:
        if op == "enq":
            try:
                b.enqueue(next_id, min(rows, max_batch), key)
                accepted.add(next_id)
            except _core.StatusError:
                pass
            next_id += 1
        elif op == "take":
            ids, expired = take(b)
            out += ids + [e[0] for e in expired]
        elif op == "cancel" and accepted:
            victim = sorted(accepted)[rows % len(accepted)]
            if b.cancel(victim):
                out.append(victim)
        else:
            clock.advance_ns(rows * 100 * US)
    b.stop()
    while (got := b.next_batch()) is not None:
        batch, expired = got
        out += (list(batch.ids) if batch is not None else []) + [e[0] for e in expired]
    assert sorted(out) == sorted(accepted)


@settings(max_examples=80, deadline=None)
@given(
    ops=st.lists(
        st.tuples(
            st.sampled_from(["enq", "enq", "enq", "poll", "cancel", "tick"]),
            st.integers(1, 4),
            st.integers(0, 2),
        ),
        max_size=60,
    ),
    max_batch=st.integers(1, 8),
    delay_us=st.sampled_from([0, 200]),
    priority_levels=st.sampled_from([0, 2]),
    preferred=st.sampled_from([[], [4]]),
    timeout_us=st.sampled_from([0, 300]),
)
def test_enqueue_says_when_the_decision_may_change(
    ops: list[tuple[str, int, int]],
    max_batch: int,
    delay_us: int,
    priority_levels: int,
    preferred: list[int],
    timeout_us: int,
) -> None:
    """enqueue() returns False (and wakes no worker) only when polling again
    would answer exactly as before: no batch, no expiry, the same wait."""
    policy = _core.QueuePolicy()
    policy.default_timeout_ns = timeout_us * US
    b, clock = make(
        max_batch=max_batch,
        delay_us=delay_us,
        default_queue_policy=policy,
        priority_levels=priority_levels,
        preferred_batch_sizes=[p for p in preferred if p <= max_batch],
    )
    next_id = 1
    for op, rows, key in ops:
        if op == "enq":
            # What a consumer would decide now, once it took what was due.
            while (before := b.poll_batch())[0] is not None or before[1]:
                pass
            changed = b.enqueue(next_id, min(rows, max_batch), key, priority=rows % 3)
            next_id += 1
            if not changed:
                after = b.poll_batch()
                assert after[0] is None
                assert not after[1]
                assert after[2] == before[2]
        elif op == "poll":
            b.poll_batch()
        elif op == "cancel":
            b.cancel(max(1, next_id - 1 - rows))
        else:
            clock.advance_ns(rows * 50 * US)


def test_enqueue_stays_quiet_while_a_run_waits_for_its_delay() -> None:
    b, _ = make(max_batch=4, delay_us=500)
    assert b.enqueue(1, 1, 7)  # the first request: a consumer must start the delay
    assert not b.enqueue(2, 1, 7)  # joins the same run under the cap: nothing changes
    assert b.enqueue(3, 1, 8)  # another shape blocks the run: it runs now
    assert take(b)[0] == [1, 2]
    assert not b.enqueue(4, 1, 8)  # behind 3, same shape: 2 of 4 rows
    assert b.enqueue(5, 2, 8)  # 4 of 4 rows: the run is full
    assert take(b)[0] == [3, 4, 5]


def test_exactly_once_with_threads_on_the_steady_clock() -> None:
    o = _core.BatcherOptions()
    o.max_batch_size = 16
    o.max_queue_delay_ns = 100 * US
    b = _core.Batcher(o)
    producers, per_producer = 4, 5_000
    seen: list[list[int]] = [[] for _ in range(3)]

    def produce(p: int) -> None:
        for i in range(per_producer):
            b.enqueue(p * per_producer + i + 1, 1, 0)

    def consume(out: list[int]) -> None:
        while (got := b.next_batch()) is not None:
            batch, expired = got
            assert not expired
            if batch is not None:
                assert batch.total_rows <= 16
                out.extend(batch.ids)

    consumers = [threading.Thread(target=consume, args=(s,)) for s in seen]
    makers = [threading.Thread(target=produce, args=(p,)) for p in range(producers)]
    for t in consumers + makers:
        t.start()
    for t in makers:
        t.join()
    b.stop()
    for t in consumers:
        t.join()
    every = [i for s in seen for i in s]
    assert len(every) == producers * per_producer
    assert set(every) == set(range(1, producers * per_producer + 1))


def test_no_memory_growth_over_a_million_requests() -> None:
    b, _ = make(max_batch=32)

    def cycle(n: int) -> None:
        for i in range(n):
            b.enqueue(i, 1, 0)
            if i % 32 == 31:
                take(b)
        while take(b)[0]:
            pass

    cycle(200_000)  # reach steady state (allocator pools, map buckets)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    cycle(1_000_000)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert after - before < 16 * 1024, f"max RSS grew by {after - before} KiB"


@pytest.mark.parametrize("cols", [3, 100_000])  # under and over the 256 KiB GIL-release size
def test_gather_rows_concatenates_without_copies_in_python(cols: int) -> None:
    parts = [
        np.arange(2 * cols, dtype=np.float32).reshape(2, cols),
        np.full((1, cols), 7, np.float32),
    ]
    out = np.empty((3, cols), np.float32)
    _core.gather_rows(parts, out)
    np.testing.assert_array_equal(out, np.concatenate(parts))
    with pytest.raises(_core.StatusError):
        _core.gather_rows(parts, np.empty((4, cols), np.float32))


@pytest.mark.skipif(sys.platform != "linux", reason="timer slack is a Linux thread attribute")
def test_timer_slack_is_set_for_the_calling_thread_only() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    pr_get_timerslack = 30

    def slack() -> int:
        return int(libc.prctl(pr_get_timerslack, 0, 0, 0, 0))

    main_before = slack()
    seen: list[int] = []

    def worker() -> None:
        assert _core.set_timer_slack_ns(1_000)
        seen.append(slack())

    t = threading.Thread(target=worker)
    t.start()
    t.join()
    assert seen == [1_000]
    assert slack() == main_before


def _trained_slo_batcher(target_ms: float) -> tuple[_core.Batcher, _core.ManualClock]:
    b, clock = make(max_batch=8, slo_target_ns=int(target_ms * MS))
    for i in range(300):  # exact t(n) = 1 ms + 0.125 ms * n, so the spread decays
        n = (1, 4, 8)[i % 3]
        b.record_execution(n, MS + n * MS // 8)
    return b, clock


def test_slo_admission_refuses_what_cannot_meet_the_target() -> None:
    b, _ = _trained_slo_batcher(10)
    # t(8) = 2 ms; 32 queued rows are 4 batches: 4 * 2 + 1 = 9 ms <= 10 ms.
    for i in range(32):
        b.enqueue(i, 1, 0)
    with pytest.raises(_core.StatusError) as info:
        b.enqueue(99, 1, 0)  # a fifth batch: 11 ms > 10 ms
    assert info.value.args[0] == "resource_exhausted"
    assert "latency target of 10.0 ms" in info.value.args[1]


def test_slo_dispatch_waits_while_the_oldest_request_can_afford_it() -> None:
    b, clock = _trained_slo_batcher(10)
    b.enqueue(1, 1, 0)
    clock.advance_ns(8 * MS)  # 8 + t(2) = 9.25 ms < 10 ms: keep growing the batch
    assert take(b) == ([], [])
    b.enqueue(2, 1, 0)
    clock.advance_ns(1 * MS)  # 9 + t(3) = 10.4 ms >= 10 ms: run now
    assert take(b)[0] == [1, 2]
