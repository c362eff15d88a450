"""Per-version inference statistics: Triton's ModelStatistics counters plus the
histograms, failure reasons and cost inputs that /metrics exports.

Contract: updated and read on the server's event-loop thread only (the HTTP
scrape thread only reads plain ints, which is safe under the GIL), so no lock.
Durations are nanoseconds from sluice._core's monotonic clock.
"""

from __future__ import annotations

import bisect
import dataclasses
import time

from sluice.errors import (
    CancelledError,
    DeadlineExceededError,
    InternalError,
    InvalidArgumentError,
    NotFoundError,
    ResourceExhaustedError,
    SluiceError,
    UnavailableError,
)

# Seconds; covers 50 µs .. 10 s, dense where CPU serving lives (0.1 - 50 ms).
LATENCY_BUCKETS_S: tuple[float, ...] = (
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05,
    0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
)  # fmt: skip
BATCH_BUCKETS: tuple[float, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
PHASES = ("request", "queue", "compute_input", "compute_infer", "compute_output")
TRITON_FAILURE_REASONS = ("REJECTED", "CANCELED", "BACKEND", "OTHER")
REJECTION_REASONS = (
    "queue_full", "slo", "timeout", "deadline", "cancelled", "model_error",
    "invalid_argument", "unavailable", "other",
)  # fmt: skip


@dataclasses.dataclass
class Duration:
    count: int = 0
    ns: int = 0

    def add(self, ns: int) -> None:
        self.count += 1
        self.ns += ns


class Histogram:
    """Cumulative-on-export bucket counts; observe() is a bisect and two adds."""

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # last: above every bound (+Inf)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value

    def cumulative(self) -> list[tuple[str, int]]:
        out, running = [], 0
        for bound, n in zip((*self.bounds, float("inf")), self.counts, strict=True):
            running += n
            out.append(("+Inf" if bound == float("inf") else repr(bound), running))
        return out


@dataclasses.dataclass
class BatchStat:
    compute_input: Duration = dataclasses.field(default_factory=Duration)
    compute_infer: Duration = dataclasses.field(default_factory=Duration)
    compute_output: Duration = dataclasses.field(default_factory=Duration)


def failure_reasons(error: BaseException) -> tuple[str, str]:
    """(Triton's failure reason, sluice's finer rejection reason) for an error."""
    if isinstance(error, ResourceExhaustedError):
        slo = "latency target" in error.message
        return "REJECTED", "slo" if slo else "queue_full"
    if isinstance(error, UnavailableError):
        timeout = "timeout expired" in error.message
        return "REJECTED", "timeout" if timeout else "unavailable"
    if isinstance(error, DeadlineExceededError):
        return "CANCELED", "deadline"
    if isinstance(error, CancelledError) or not isinstance(error, SluiceError):
        return "CANCELED", "cancelled"
    if isinstance(error, InternalError):
        return "BACKEND", "model_error"
    if isinstance(error, InvalidArgumentError | NotFoundError):
        return "OTHER", "invalid_argument"
    return "OTHER", "other"


@dataclasses.dataclass
class InferStats:
    success: Duration = dataclasses.field(default_factory=Duration)
    fail: Duration = dataclasses.field(default_factory=Duration)
    queue: Duration = dataclasses.field(default_factory=Duration)
    compute_input: Duration = dataclasses.field(default_factory=Duration)
    compute_infer: Duration = dataclasses.field(default_factory=Duration)
    compute_output: Duration = dataclasses.field(default_factory=Duration)
    inference_count: int = 0  # rows inferred (a batch of n counts n)
    execution_count: int = 0  # model executions
    last_inference_ms: int = 0  # wall-clock ms since the epoch, as Triton reports
    batch_stats: dict[int, BatchStat] = dataclasses.field(default_factory=dict)
    failures: dict[str, int] = dataclasses.field(
        default_factory=lambda: dict.fromkeys(TRITON_FAILURE_REASONS, 0)
    )
    rejections: dict[str, int] = dataclasses.field(default_factory=dict)
    phases: dict[str, Histogram] = dataclasses.field(
        default_factory=lambda: {p: Histogram(LATENCY_BUCKETS_S) for p in PHASES}
    )
    batch_sizes: Histogram = dataclasses.field(default_factory=lambda: Histogram(BATCH_BUCKETS))
    inflight: int = 0  # accepted by the data plane, not yet answered
    detailed: bool = True  # histograms on (off with --allow-metrics false)
    # Progressive delivery: requests routed to this version by arm, shadow
    # comparisons by result, canary rollbacks by reason.
    arms: dict[str, int] = dataclasses.field(default_factory=dict)
    shadow: dict[str, int] = dataclasses.field(default_factory=dict)
    rollbacks: dict[str, int] = dataclasses.field(default_factory=dict)
    core_ns: int = 0  # compute time x intra-op threads: the CPU the model used (cost)
    # Schema skew: requests refused for a mismatch with the signature, by
    # (input name, kind): kind is "name" (input "(unknown)" for a name the model
    # does not have, else the missing input's), "datatype"
    # or "shape" (dims or batch size).
    schema_skew: dict[tuple[str, str], int] = dataclasses.field(default_factory=dict)

    def count_schema_skew(self, input_name: str, kind: str) -> None:
        key = (input_name, kind)
        self.schema_skew[key] = self.schema_skew.get(key, 0) + 1

    def record_request(
        self,
        *,
        request_ns: int,
        queue_ns: int,
        compute_input_ns: int,
        compute_infer_ns: int,
        compute_output_ns: int,
    ) -> None:
        """One successful request; its phases as Triton splits them."""
        self.success.add(request_ns)
        self.queue.add(queue_ns)
        self.compute_input.add(compute_input_ns)
        self.compute_infer.add(compute_infer_ns)
        self.compute_output.add(compute_output_ns)
        self.last_inference_ms = time.time_ns() // 1_000_000
        if not self.detailed:
            return
        for phase, ns in zip(
            PHASES,
            (request_ns, queue_ns, compute_input_ns, compute_infer_ns, compute_output_ns),
            strict=True,
        ):
            self.phases[phase].observe(ns * 1e-9)

    def record_execution(
        self,
        *,
        batch_size: int,
        compute_input_ns: int,
        compute_infer_ns: int,
        compute_output_ns: int,
        threads: int = 1,
    ) -> None:
        """One model execution of `batch_size` rows (however many requests)."""
        self.inference_count += batch_size
        self.execution_count += 1
        if self.detailed:
            self.batch_sizes.observe(batch_size)
        self.core_ns += compute_infer_ns * threads
        bs = self.batch_stats.setdefault(batch_size, BatchStat())
        bs.compute_input.add(compute_input_ns)
        bs.compute_infer.add(compute_infer_ns)
        bs.compute_output.add(compute_output_ns)

    def count_arm(self, arm: str) -> None:
        self.arms[arm] = self.arms.get(arm, 0) + 1

    def count_shadow(self, result: str) -> None:
        self.shadow[result] = self.shadow.get(result, 0) + 1

    def record_failure(self, request_ns: int, error: BaseException) -> None:
        self.fail.add(request_ns)
        triton, sluice = failure_reasons(error)
        self.failures[triton] += 1
        self.rejections[sluice] = self.rejections.get(sluice, 0) + 1
