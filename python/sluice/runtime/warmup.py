"""Warm-up before a version reports READY: Triton's model_warmup when the config
has it, else one generated request (batch 1, dynamic dims 1, zeros)."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from sluice import datatypes
from sluice.errors import ModelLoadError
from sluice.proto import model_config_pb2 as mc
from sluice.repository import layout
from sluice.runtime.session import ModelRuntime

log = logging.getLogger(__name__)


def _array(
    dt: datatypes.DataType, shape: list[int], fill: str, rng: np.random.Generator, raw: bytes | None
) -> np.ndarray[Any, Any]:
    if raw is not None and not dt.is_bytes:
        assert dt.numpy is not None
        return np.frombuffer(raw, dtype=dt.numpy).reshape(shape)
    return datatypes.generated(dt, shape, rng, fill)


# Warm-up data beyond this is refused: a warm-up request is one small batch.
MAX_WARMUP_FILE_BYTES = 256 * 1024 * 1024


def _warmup_file(
    model_dir: Path, filename: str, dt: datatypes.DataType, shape: list[int], input_name: str
) -> bytes:
    """The bytes of `<model>/warmup/<filename>`: inside the model folder, a
    regular file, exactly the declared tensor's size (fixed-size types). The
    error never says whether a path outside the folder exists, nor its size."""
    path = layout.inside(model_dir, Path("warmup") / filename, f"warm-up file of '{input_name}'")
    what = f"warm-up file {filename!r} of input '{input_name}'"
    expected = None
    if not dt.is_bytes:
        expected = math.prod(shape) * dt.itemsize
    try:
        return layout.read_bounded(path, MAX_WARMUP_FILE_BYTES, what, expected_bytes=expected)
    except FileNotFoundError:
        raise ModelLoadError(f"{what} is not in the model's warmup folder") from None


def _configured_requests(
    config: mc.ModelConfig, model_dir: Path
) -> list[tuple[str, int, dict[str, np.ndarray[Any, Any]]]]:
    rng = np.random.default_rng(0)
    requests = []
    for w in config.model_warmup:
        feeds: dict[str, np.ndarray[Any, Any]] = {}
        for name, spec in w.inputs.items():
            dt = datatypes.by_config_enum(spec.data_type)
            batch = [max(1, w.batch_size)] if config.max_batch_size > 0 else []
            shape = batch + list(spec.dims)
            which = spec.WhichOneof("input_data_type")
            raw = None
            if which == "input_data_file":
                raw = _warmup_file(model_dir, spec.input_data_file, dt, shape, name)
            feeds[name] = _array(
                dt, shape, "random" if which == "random_data" else "zero", rng, raw
            )
        requests.append((w.name or "warmup", max(1, w.count), feeds))
    return requests


def _generated_request(config: mc.ModelConfig) -> dict[str, np.ndarray[Any, Any]]:
    rng = np.random.default_rng(0)
    feeds = {}
    for t in config.input:
        dt = datatypes.by_config_enum(t.data_type)
        dims = list(t.reshape.shape) if t.HasField("reshape") else list(t.dims)
        shape = ([1] if config.max_batch_size > 0 else []) + [d if d >= 0 else 1 for d in dims]
        feeds[t.name] = _array(dt, shape, "zero", rng, None)
    return feeds


# A configured warm-up (count x instances runs) stops failing the load past this:
# a config cannot keep a version LOADING, and its load slot taken, for hours.
WARMUP_BUDGET_S = 300.0


def warm_up(
    runtime: ModelRuntime,
    config: mc.ModelConfig,
    model_dir: Path,
    budget_s: float = WARMUP_BUDGET_S,
    on_abandon: Callable[[Callable[[], None]], bool] | None = None,
) -> None:
    """Runs warm-up requests on every instance. A configured warm-up that fails,
    or runs past `budget_s` (checked between runs), fails the load (as in
    Triton); a generated one only logs, since a model may legitimately reject
    synthetic zeros.

    `on_abandon` (a LoadAttempt's) registers a callback for when the load is
    given up: it sets onnxruntime's terminate flag, so a warm-up run that would
    go on for ever ends (onnxruntime checks the flag between nodes)."""
    outputs = [o.name for o in config.output]
    deadline = time.monotonic() + budget_s
    options = ort.RunOptions()
    options.log_severity_level = 4  # a terminated run is expected here, not an error
    if on_abandon is not None and not on_abandon(lambda: setattr(options, "terminate", True)):
        raise ModelLoadError("the load was abandoned before warm-up")
    if config.model_warmup:
        try:
            requests = _configured_requests(config, model_dir)
        except (OSError, ValueError, KeyError) as exc:
            raise ModelLoadError(
                f"model_warmup of model '{config.name}' is invalid: {exc}"
            ) from exc
        for name, count, feeds in requests:
            for _ in range(count * runtime.instance_count):
                if time.monotonic() >= deadline:
                    raise ModelLoadError(
                        f"warm-up '{name}' of model '{config.name}' ran past its "
                        f"{budget_s:g} s budget"
                    )
                try:
                    runtime.run(feeds, outputs, options)
                except Exception as exc:
                    raise ModelLoadError(
                        f"warm-up '{name}' of model '{config.name}' failed: {exc}"
                    ) from exc
        return
    feeds = _generated_request(config)
    for _ in range(runtime.instance_count):
        try:
            runtime.run(feeds, outputs, options)
        except Exception as exc:
            if options.terminate:
                raise ModelLoadError("warm-up stopped: the load was abandoned") from None
            log.warning("generated warm-up of model '%s' failed (ignored): %s", config.name, exc)
            return
