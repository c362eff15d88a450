"""Executors: where a formed batch runs. One interface, two implementations.

- `thread`: instance worker threads in the server process (onnxruntime releases
  the GIL while it runs; the worker needs the GIL to start and to deliver).
- `process`: one child process per instance. The event loop gathers a batch's
  inputs into shared memory with one C++ copy, sends a small descriptor, and
  learns of completion when the child's socket becomes readable; no thread of
  the server waits for the GIL, and a crash fails only the batch in flight.

The scheduler (sluice.scheduling) owns the queue and answers requests; an
executor only runs batches and hands each back once, as a BatchOutcome.
"""

from sluice.executors.base import (
    EXECUTOR_KINDS,
    BatchOutcome,
    Executor,
    ExecutorHost,
    executor_kind,
)

__all__ = ["EXECUTOR_KINDS", "BatchOutcome", "Executor", "ExecutorHost", "executor_kind"]
