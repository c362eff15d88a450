"""onnxruntime sessions: providers verified after creation, thread budgets,
warm-up, and run(). The only package that imports onnxruntime."""

from sluice.runtime.resources import available_cores
from sluice.runtime.session import ModelRuntime, RuntimeOptions, load_runtime

__all__ = ["ModelRuntime", "RuntimeOptions", "available_cores", "load_runtime"]
