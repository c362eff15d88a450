"""Stubs for the compiled core (csrc/bindings)."""

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
from typing_extensions import Buffer

__version__: str

class StatusError(Exception):
    """args == (code_name, message); code names match sluice.errors.ErrorCode."""

def monotonic_ns() -> int: ...
def decode_bytes_tensor(data: Buffer, count: int, as_text: bool) -> list[str] | list[bytes]: ...
def encode_bytes_tensor(elements: Iterable[str | bytes]) -> bytes: ...

class TimeoutAction:
    REJECT: TimeoutAction
    DELAY: TimeoutAction

class QueuePolicy:
    timeout_action: TimeoutAction
    default_timeout_ns: int
    allow_timeout_override: bool
    max_queue_size: int
    def __init__(self) -> None: ...

class BatcherOptions:
    max_batch_size: int
    batching: bool
    preferred_batch_sizes: list[int]
    max_queue_delay_ns: int
    preserve_ordering: bool
    priority_levels: int
    default_priority_level: int
    default_queue_policy: QueuePolicy
    priority_queue_policy: dict[int, QueuePolicy]
    slo_target_ns: int
    instance_count: int
    def __init__(self) -> None: ...

class Batch:
    @property
    def ids(self) -> list[int]: ...
    @property
    def rows(self) -> list[int]: ...
    @property
    def enqueued_ns(self) -> list[int]: ...
    @property
    def total_rows(self) -> int: ...
    @property
    def formed_ns(self) -> int: ...
    @property
    def sequence(self) -> int: ...

class ManualClock:
    def __init__(self, start_ns: int = 0) -> None: ...
    def now_ns(self) -> int: ...
    def advance_ns(self, delta_ns: int) -> None: ...
    def set_ns(self, now_ns: int) -> None: ...

# (batch or None, [(id, code_name, message), ...]); None once stopped and drained.
_Next = tuple[Batch | None, list[tuple[int, str, str]]]

class Batcher:
    def __init__(self, options: BatcherOptions, clock: ManualClock | None = None) -> None: ...
    def enqueue(
        self,
        id: int,
        rows: int,
        shape_key: int,
        priority: int = 0,
        timeout_ns: int = 0,
        force_timeout: bool = False,
    ) -> None: ...
    def next_batch(self, max_wait_ns: int = -1) -> _Next | None: ...
    def try_next_batch(self) -> _Next: ...
    def cancel(self, id: int) -> bool: ...
    def stop(self) -> None: ...
    def record_execution(self, rows: int, exec_ns: int) -> None: ...
    @property
    def queued_requests(self) -> int: ...
    @property
    def queued_rows(self) -> int: ...

def gather_rows(parts: Sequence[np.ndarray[Any, Any]], out: np.ndarray[Any, Any]) -> None: ...
