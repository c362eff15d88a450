"""onnxruntime sessions: providers verified after creation, thread budgets,
warm-up, and run(). The only package that imports onnxruntime."""

from sluice.runtime.resources import available_cores
from sluice.runtime.session import (
    ModelRuntime,
    RuntimeInfo,
    RuntimeOptions,
    instance_count,
    load_runtime,
)

__all__ = [
    "ModelRuntime",
    "RuntimeInfo",
    "RuntimeOptions",
    "available_cores",
    "instance_count",
    "load_runtime",
]
