"""A graph's signature without serving it: `sluice models` checks that a file
loads in onnxruntime and records its inputs and outputs as the server sees them."""

from __future__ import annotations

from pathlib import Path

import onnxruntime as ort

from sluice import config as cfg
from sluice.errors import ModelLoadError
from sluice.runtime.session import CPU, _signature


def probe_signature(path: Path) -> cfg.Signature:
    """Loads `path` in a throwaway CPU session and returns its signature, the
    same one the server derives (symbolic and unnamed dims become -1).
    Raises ModelLoadError with onnxruntime's message when it does not load."""
    so = ort.SessionOptions()
    so.log_severity_level = 3  # errors only: the exception carries what matters
    # The session only answers "does it load"; no thread pool sized for serving.
    so.intra_op_num_threads = 1
    try:
        session = ort.InferenceSession(str(path), sess_options=so, providers=[CPU])
    except Exception as exc:  # onnxruntime raises several exception types
        raise ModelLoadError(f"onnxruntime cannot load {path}: {exc}") from exc
    return _signature(session)
