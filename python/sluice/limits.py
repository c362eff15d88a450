"""Bounds on what one request may ask of the server, checked at the edge.

Two kinds: the range of a request parameter (a value the core cannot hold is a
client error, INVALID_ARGUMENT naming the parameter, never an exception deep in
the scheduler), and the size of a request (bytes, tensor elements, requests in
flight per model), answered with RESOURCE_EXHAUSTED.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from sluice.errors import InvalidArgumentError, ResourceExhaustedError, shown

UINT32_MAX = (1 << 32) - 1
INT64_MAX = (1 << 63) - 1
# Triton's `timeout` parameter is in microseconds; the core takes int64 ns.
MAX_TIMEOUT_US = INT64_MAX // 1_000

# The ranges of the request parameters the scheduler takes (Triton's names).
PARAMETER_RANGES: dict[str, tuple[int, int]] = {
    "priority": (0, UINT32_MAX),  # > priority_levels falls to the lowest level, as in Triton
    "timeout": (0, MAX_TIMEOUT_US),
}


def int_parameter(parameters: Mapping[str, object], key: str, model_name: str) -> int:
    """Request parameter `key` as an int in its range; 0 when absent. Raises
    InvalidArgumentError naming the parameter, its range and the model."""
    value = parameters.get(key)
    if value is None:
        return 0
    low, high = PARAMETER_RANGES[key]
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        shown = repr(value)
        if len(shown) > 40:
            shown = shown[:37] + "..."
        raise InvalidArgumentError(
            f"parameter '{key}' of a request for model '{_one_line(model_name)}' must be an "
            f"integer in [{low}, {high}], got {shown}"
        )
    return value


def _one_line(name: str) -> str:
    """A client's name for a message: escaped to one line, bounded (found by fuzzing:
    a model name of newlines made a multi-line reason)."""
    return shown(name)


@dataclasses.dataclass(frozen=True)
class RequestLimits:
    """Per-request bounds; 0 means unbounded (only for max_inflight_per_model).

    max_request_bytes: the largest request message (gRPC's receive limit).
    max_tensor_elements: the most elements one input tensor may declare.
    max_inflight_per_model: requests of one model accepted and not yet answered;
        beyond it a request is refused at once instead of queued in memory.
    """

    max_request_bytes: int = 256 * 1024 * 1024
    max_tensor_elements: int = 1 << 31
    max_inflight_per_model: int = 0

    def __post_init__(self) -> None:
        if not 1024 <= self.max_request_bytes <= (1 << 31) - 1:
            raise ValueError("max_request_bytes must be in [1024, 2^31 - 1] (gRPC's limit)")
        if not 1 <= self.max_tensor_elements <= 1 << 40:
            raise ValueError("max_tensor_elements must be in [1, 2^40]")
        if self.max_inflight_per_model < 0:
            raise ValueError("max_inflight_per_model must be >= 0 (0: unbounded)")

    def check_elements(self, count: int, where: str) -> None:
        if count > self.max_tensor_elements:
            raise ResourceExhaustedError(
                f"{where}: {count} elements exceed the server's limit of "
                f"{self.max_tensor_elements} per tensor (--max-tensor-elements)"
            )

    def check_inflight(self, inflight: int, model_name: str) -> None:
        """`inflight`: the model's requests already accepted, this one excluded."""
        limit = self.max_inflight_per_model
        if limit and inflight >= limit:
            raise ResourceExhaustedError(
                f"model '{_one_line(model_name)}' has {inflight} requests in flight (all "
                "versions), the server's limit (--max-inflight-per-model); retry later"
            )


# The running server's limits; set once by the composition root at start.
_current = RequestLimits()


def current() -> RequestLimits:
    return _current


def configure(limits: RequestLimits) -> None:
    global _current
    _current = limits
