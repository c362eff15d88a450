"""Per-version inference statistics in Triton's shape (ModelStatistics).

Contract: updated and read on the server's event-loop thread only, so no lock.
Durations are nanoseconds from sluice._core's monotonic clock.
"""

from __future__ import annotations

import dataclasses
import time


@dataclasses.dataclass
class Duration:
    count: int = 0
    ns: int = 0

    def add(self, ns: int) -> None:
        self.count += 1
        self.ns += ns


@dataclasses.dataclass
class BatchStat:
    compute_input: Duration = dataclasses.field(default_factory=Duration)
    compute_infer: Duration = dataclasses.field(default_factory=Duration)
    compute_output: Duration = dataclasses.field(default_factory=Duration)


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

    def record_execution(
        self,
        *,
        batch_size: int,
        compute_input_ns: int,
        compute_infer_ns: int,
        compute_output_ns: int,
    ) -> None:
        """One model execution of `batch_size` rows (however many requests)."""
        self.inference_count += batch_size
        self.execution_count += 1
        bs = self.batch_stats.setdefault(batch_size, BatchStat())
        bs.compute_input.add(compute_input_ns)
        bs.compute_infer.add(compute_infer_ns)
        bs.compute_output.add(compute_output_ns)

    def record_failure(self, request_ns: int) -> None:
        self.fail.add(request_ns)
