"""The executor interface and the outcome every executor hands back."""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np

from sluice.errors import ModelLoadError, SluiceError
from sluice.proto import model_config_pb2 as mc

Array = np.ndarray[Any, Any]

THREAD = "thread"
PROCESS = "process"
EXECUTOR_KINDS = (THREAD, PROCESS)


def executor_kind(config: mc.ModelConfig, server_default: str) -> str:
    """The model's `executor` parameter, else the server's --executor."""
    kind = server_default
    if "executor" in config.parameters:
        kind = config.parameters["executor"].string_value.strip()
    if kind not in EXECUTOR_KINDS:
        raise ModelLoadError(
            f"parameter 'executor' must be one of {', '.join(EXECUTOR_KINDS)}, got {kind!r}"
        )
    if kind == PROCESS and not sys.platform.startswith("linux"):
        raise ModelLoadError("the process executor needs Linux (memfd, timerfd); use 'thread'")
    return kind


@dataclasses.dataclass
class BatchOutcome:
    """One batch, handed back once by its executor: outputs split per request
    (in batch order) or one error for every request in it."""

    batch: Any  # _core.Batch
    ids: list[int]  # batch.ids, read once (each read of a Batch field copies it)
    tickets: list[Any]  # the scheduler's tickets, in batch order
    outputs: list[dict[str, Array]] | None
    error: SluiceError | None
    compute_start_ns: int
    infer_start_ns: int
    infer_end_ns: int
    outputs_ready_ns: int  # split per request, before the hop to the loop
    # The batch's contiguous inputs and the model's outputs, for the drift
    # monitor (which runs after the outcome was posted).
    feeds: dict[str, Array] | None = None
    results: list[Array] | None = None


class ExecutorHost(Protocol):
    """What an executor needs from its scheduler. Loop-thread methods only,
    except `take_tickets`, `split` and `observe`, which are thread-safe."""

    label: str  # "'model' version N", for messages
    observes: bool  # `observe` uses a batch's inputs (drift): worth handing them over

    def take_tickets(self, ids: Sequence[int]) -> list[Any]: ...
    def split(
        self, results: list[Array], rows: list[int], total_rows: int
    ) -> list[dict[str, Array]]: ...
    def deliver(self, outcome: BatchOutcome) -> None: ...  # loop thread
    def expire(self, expired: Sequence[tuple[int, str, str]]) -> None: ...  # loop thread
    def observe(self, outcome: BatchOutcome) -> None: ...  # drift, after delivery
    def record_execution(self, rows: int, infer_ns: int) -> None: ...


class Executor(Protocol):
    """Runs the batches of one model version on its instances.

    Contract: every batch taken from the batcher comes back exactly once
    through `host.deliver` (on the loop thread), with its outputs or an error;
    expired requests go to `host.expire`. After `stop` returns, the queue is
    drained, every batch is answered and every instance is released.
    """

    kind: str
    instance_count: int

    def attach(self, host: ExecutorHost, batcher: Any, loop: Any, output_names: list[str]) -> None:
        """Connects the executor to its scheduler (any thread, once)."""

    def start(self) -> None:
        """On the loop thread, once the version is about to serve."""

    def notify_enqueued(self) -> None:
        """On the loop thread, after a successful enqueue that may change the
        batcher's decision (the batcher says which; a request that only joins a
        run waiting for its delay does not call this)."""

    @property
    def restarts(self) -> int:
        """Instances restarted after they died."""

    @property
    def available(self) -> bool:
        """At least one instance can run a batch now or soon."""

    async def stop(self) -> None:
        """Drains the queue through the instances, then releases them."""

    def close(self) -> None:
        """Releases the instances at once (a load that failed before serving)."""
