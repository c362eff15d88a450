"""In-process drift monitoring of a model version (README "Drift monitoring").

Layout. The *profiled tensors* of a version are its inputs and outputs of a
numeric type with exactly one non-batch dimension (``[batch, d]``): each of the
``d`` columns is a feature. Inputs or outputs of rank > 2 (images, sequences)
and BYTES tensors are skipped: per-element features of an image say nothing
useful and would cost one histogram per pixel. For models without batching
(max_batch_size 0) the first dimension is the rows.

Files beside the version (``<model>/<version>/``), written by ``sluice profile``:

* ``drift_profile.bin``: the kernel profile of the first profiled input
  (``drift_stats.save_profile``); further inputs in ``drift_profile.<input>.bin``;
* ``drift_profile_outputs.bin``: the first profiled output (the *prediction
  profile*); further outputs in ``drift_profile_outputs.<output>.bin``;
* ``drift_profile.json``: the manifest: per tensor its file, feature names and kinds.

Feature names: ``<input>[i]``, and ``output:<output>[i]`` for outputs. Input
features are numeric unless named categorical (config parameter
``drift_categorical``, comma-separated, or ``sluice profile --categorical``; a
name is ``<input>[i]`` or ``f<i>`` for column i of the first input). Integer
and bool outputs (e.g. a class label) are categorical, float outputs numeric.

Serving: a version with a manifest gets one ``DriftWindow`` per profiled tensor
(panes of ``drift_window_seconds / drift_panes`` seconds, default 60 s in 6
panes), fed by the instance worker threads after a batch's results went back
to the event loop. Statistics are computed on demand (scrape, RPC).

Feature skew (a pipeline mismatch, not drift): a numeric feature with at least
``SKEW_MIN_ROWS`` window values is flagged

* ``scale`` when std_serving / std_ref is above ``SKEW_STD_RATIO`` (10) or below
  its inverse: a feature scaled (standardised, in other units) in training but
  not in serving changes its spread by orders of magnitude, while real drift
  rarely changes it tenfold;
* ``location`` when |mean_serving - mean_ref| > ``SKEW_MEAN_SIGMAS`` (5) x std_ref:
  the mean of 30 values varies by std/sqrt(30) ~ 0.18 std, so 5 std is far outside
  sampling noise and beyond ordinary shifts (a 1-std shift is drift, not skew);
* ``range`` when more than half of the window lies outside the training [min, max]
  (a 1-std shift of a normal feature puts ~2 % there).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import math
import os
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from sluice import _core
from sluice.errors import InvalidArgumentError
from sluice.monitoring import drift_stats
from sluice.proto import model_config_pb2 as mc

Array = np.ndarray[Any, Any]
log = logging.getLogger(__name__)

MANIFEST_FILENAME = "drift_profile.json"
INPUT_FILENAME = drift_stats.PROFILE_FILENAME  # drift_profile.bin
OUTPUT_FILENAME = "drift_profile_outputs.bin"
DEFAULT_WINDOW_SECONDS = 60.0
DEFAULT_PANES = 6
SKEW_MIN_ROWS = 30
SKEW_STD_RATIO = 10.0
SKEW_MEAN_SIGMAS = 5.0
SKEW_OUT_OF_RANGE = 0.5
# Concept drift (Feedback RPC).
PREDICTIONS_KEPT = 100_000
QUALITY_WINDOW = 1000  # labelled rows the rolling metrics cover
QUALITY_MIN_ROWS = 30
ACCURACY_DROP = 0.05  # degraded: accuracy < baseline - 0.05
ERROR_GROWTH = 1.2  # degraded: mae or rmse > 1.2 x baseline
# Statistics exported as sluice_drift_score{statistic=...}.
SCORE_STATISTICS = (
    "psi",
    "js",
    "hellinger",
    "ks_d",
    "wasserstein_normed",
    "p_adjusted",
    "out_of_range_share",
    "unseen_share",
)


class ProfileError(ValueError):
    """A model or data set that cannot be profiled."""


@dataclasses.dataclass
class TensorProfile:
    name: str  # tensor name
    output: bool
    file: str
    features: list[str]
    kinds: list[str]  # "numeric" / "categorical"
    profile: _core.DriftProfile | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "file": self.file,
            "features": self.features,
            "kinds": self.kinds,
        }


# ---- layout --------------------------------------------------------------------


def config_param(config: mc.ModelConfig, key: str) -> str | None:
    if key in config.parameters:
        return config.parameters[key].string_value
    return None


def _columns(config: mc.ModelConfig, t: Any) -> int | None:
    """Feature count of a tensor, or None when it is not profiled."""
    if t.data_type in (mc.TYPE_STRING, mc.TYPE_INVALID):
        return None
    dims = list(t.reshape.shape) if t.HasField("reshape") else list(t.dims)
    if config.max_batch_size == 0:
        dims = dims[1:]
    if len(dims) != 1 or dims[0] < 1:
        return None
    return int(dims[0])


def feature_name(tensor: str, column: int, output: bool) -> str:
    return f"{'output:' if output else ''}{tensor}[{column}]"


def layout(
    config: mc.ModelConfig, categorical: Sequence[str] = ()
) -> tuple[list[TensorProfile], list[TensorProfile]]:
    """The profiled inputs and outputs of a (completed) config."""
    wanted = {c.strip() for c in categorical if c.strip()}
    param = config_param(config, "drift_categorical")
    if param:
        wanted |= {c.strip() for c in param.split(",") if c.strip()}
    inputs: list[TensorProfile] = []
    for t in config.input:
        d = _columns(config, t)
        if d is None:
            continue
        file = INPUT_FILENAME if not inputs else f"drift_profile.{t.name}.bin"
        names = [feature_name(t.name, i, False) for i in range(d)]
        first = not inputs
        kinds = [
            "categorical" if n in wanted or (first and f"f{i}" in wanted) else "numeric"
            for i, n in enumerate(names)
        ]
        inputs.append(TensorProfile(t.name, False, file, names, kinds))
    known = {n for tp in inputs for n in tp.features}
    known |= {f"f{i}" for i in range(len(inputs[0].features))} if inputs else set()
    unknown = sorted(wanted - known)
    if unknown:
        raise ProfileError(f"categorical feature(s) {', '.join(unknown)} are not profiled inputs")
    outputs: list[TensorProfile] = []
    for o in config.output:
        d = _columns(config, o)
        if d is None:
            continue
        file = OUTPUT_FILENAME if not outputs else f"drift_profile_outputs.{o.name}.bin"
        integral = o.data_type not in (mc.TYPE_FP16, mc.TYPE_FP32, mc.TYPE_FP64, mc.TYPE_BF16)
        kind = "categorical" if integral else "numeric"
        names = [feature_name(o.name, i, True) for i in range(d)]
        outputs.append(TensorProfile(o.name, True, file, names, [kind] * d))
    return inputs, outputs


def as_matrix(arr: Array) -> Array:
    """rows x features view of a batch tensor (a copy only if not contiguous)."""
    if not arr.flags.c_contiguous:
        arr = np.ascontiguousarray(arr)
    if arr.ndim != 2:
        arr = arr.reshape(arr.shape[0] if arr.ndim else 1, -1)
    return arr


# ---- files -----------------------------------------------------------------------


def save(version_dir: Path, tensors: Sequence[TensorProfile], rows: int) -> None:
    for tp in tensors:
        assert tp.profile is not None
        path = version_dir / tp.file
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(tp.profile.to_bytes())
        os.replace(tmp, path)
    manifest = {
        "format": 1,
        "rows": rows,
        "inputs": [t.to_json() for t in tensors if not t.output],
        "outputs": [t.to_json() for t in tensors if t.output],
    }
    path = version_dir / MANIFEST_FILENAME
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def load(version_dir: Path) -> list[TensorProfile] | None:
    """The stored profiles of a version, or None when it has none."""
    # Imported here: sluice.repository imports this module.
    from sluice.repository import layout as files

    path = version_dir / MANIFEST_FILENAME
    if not path.is_file():
        if (version_dir / INPUT_FILENAME).is_file():
            raise ProfileError(
                f"{INPUT_FILENAME} without {MANIFEST_FILENAME}; rerun sluice profile"
            )
        return None

    def read(name: str, max_bytes: int) -> bytes:
        # The manifest names the profile files: each stays inside the model folder.
        where = files.inside(version_dir.parent, Path(version_dir.name) / name, "profile file")
        return files.read_bounded(where, max_bytes, f"drift profile file {name!r}")

    manifest = json.loads(read(MANIFEST_FILENAME, files.MAX_SMALL_FILE_BYTES).decode("utf-8"))
    tensors: list[TensorProfile] = []
    for key, output in (("inputs", False), ("outputs", True)):
        for entry in manifest.get(key, []):
            tp = TensorProfile(
                entry["name"], output, entry["file"], list(entry["features"]), list(entry["kinds"])
            )
            tp.profile = _core.DriftProfile.from_bytes(read(tp.file, files.MAX_PROFILE_BYTES))
            if tp.profile.num_features != len(tp.features):
                raise ProfileError(f"{tp.file}: feature count disagrees with {MANIFEST_FILENAME}")
            tensors.append(tp)
    return tensors


# ---- reports ---------------------------------------------------------------------


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


def skew_flags(ref: _core.NumericProfile, f: _core.FeatureDrift) -> list[str]:
    """The feature-skew rule of the module docstring."""
    if f.m < SKEW_MIN_ROWS or ref.n < 2:
        return []
    flags: list[str] = []
    sd_ref, sd = ref.stddev, f.stddev
    if sd_ref > 0 and sd > 0:
        ratio = sd / sd_ref
        if ratio > SKEW_STD_RATIO or ratio < 1 / SKEW_STD_RATIO:
            flags.append("scale")
    elif sd_ref == 0 and sd > 0 and ref.max > ref.min:
        flags.append("scale")
    if sd_ref > 0 and abs(f.mean - ref.mean) > SKEW_MEAN_SIGMAS * sd_ref:
        flags.append("location")
    if f.out_of_range_share > SKEW_OUT_OF_RANGE:
        flags.append("range")
    return flags


def tensor_report(
    tp: TensorProfile, report: _core.DriftReport, window: _core.DriftWindow | None
) -> dict[str, Any]:
    """One tensor's report as a JSON-ready dict (drift_stats.report_to_dict plus
    skew flags, reference moments and histograms for plots)."""
    assert tp.profile is not None
    out = drift_stats.report_to_dict(report, tp.features)
    for i, (entry, f) in enumerate(zip(out["features"], report.features, strict=True)):
        if f.kind == _core.FeatureKind.NUMERIC:
            ref = tp.profile.numeric(i)
            entry["skew"] = skew_flags(ref, f)
            entry["mean_ref"] = _finite(ref.mean)
            entry["stddev_ref"] = _finite(ref.stddev)
            entry["min_ref"] = _finite(ref.min)
            entry["max_ref"] = _finite(ref.max)
            entry["edges"] = [float(e) for e in ref.edges]
            entry["reference_counts"] = [int(c) for c in ref.counts]
        else:
            cat = tp.profile.categorical(i)
            entry["skew"] = []
            entry["codes"] = [int(c) for c in cat.codes]
            entry["reference_counts"] = [int(c) for c in cat.counts] + [0]
        entry["window_counts"] = [int(c) for c in window.counts(i)[0]] if window is not None else []
    return out


def offline_report(tensors: Sequence[TensorProfile], data: Mapping[str, Array]) -> dict[str, Any]:
    """Drift of a data set (arrays by tensor name) against the stored profiles."""
    result: dict[str, Any] = {"available": True, "reason": "", "inputs": None, "outputs": None}
    for tp in tensors:
        if tp.name not in data:
            continue
        assert tp.profile is not None
        window = _core.DriftWindow(tp.profile)
        window.update(as_matrix(data[tp.name]), 0)
        rep = tensor_report(tp, window.statistics(), window)
        key = "outputs" if tp.output else "inputs"
        result[key] = merge_reports(result[key], rep)
    return result


def merge_reports(a: dict[str, Any] | None, b: dict[str, Any]) -> dict[str, Any]:
    """Two tensors' reports as one (feature lists concatenated, shares recounted)."""
    if a is None:
        return b
    merged = dict(a)
    merged["features"] = a["features"] + b["features"]
    merged["evaluated"] = a["evaluated"] + b["evaluated"]
    merged["drifted"] = a["drifted"] + b["drifted"]
    ev = merged["evaluated"]
    merged["drift_share"] = merged["drifted"] / ev if ev else None
    merged["dataset"] = (
        "insufficient_data"
        if not ev
        else "drift"
        if merged["drifted"] / ev >= _core.VerdictOptions().drift_share
        else "no_drift"
    )
    return merged


# ---- concept drift ---------------------------------------------------------------


@dataclasses.dataclass
class Quality:
    """Rolling prediction quality from Feedback, against metadata.json's baseline."""

    task: str  # "classification" / "regression"
    baseline: dict[str, float]
    errors: collections.deque[float] = dataclasses.field(
        default_factory=lambda: collections.deque(maxlen=QUALITY_WINDOW)
    )  # classification: 1 - correct; regression: prediction - truth

    def add(self, predicted: float, truth: float) -> None:
        if self.task == "classification":
            self.errors.append(0.0 if int(predicted) == int(truth) else 1.0)
        else:
            self.errors.append(predicted - truth)

    def metrics(self) -> dict[str, float]:
        if not self.errors:
            return {}
        e = np.fromiter(self.errors, dtype=np.float64)
        if self.task == "classification":
            return {"accuracy": float(1.0 - e.mean())}
        return {"mae": float(np.abs(e).mean()), "rmse": float(np.sqrt((e * e).mean()))}

    def degraded(self) -> tuple[bool, str]:
        """(degraded, why) by the documented rule; False with too few labels or no baseline."""
        current = self.metrics()
        if len(self.errors) < QUALITY_MIN_ROWS:
            return False, f"fewer than {QUALITY_MIN_ROWS} labelled rows"
        if self.task == "classification":
            base = self.baseline.get("accuracy")
            if base is None:
                return False, "no accuracy baseline in metadata.json"
            if current["accuracy"] < base - ACCURACY_DROP:
                return True, f"accuracy {current['accuracy']:.3f} < baseline {base:.3f} - 0.05"
            return False, ""
        why = []
        for key in ("mae", "rmse"):
            base = self.baseline.get(key)
            if base is not None and current[key] > ERROR_GROWTH * base:
                why.append(f"{key} {current[key]:.4g} > 1.2 x baseline {base:.4g}")
        if not any(k in self.baseline for k in ("mae", "rmse")):
            return False, "no mae/rmse baseline in metadata.json"
        return bool(why), "; ".join(why)


def prediction_of(arr: Array) -> list[float]:
    """Per-row predictions of the first output: argmax over the last axis when it
    has more than one column (class scores), else the value itself (a class
    label for integer outputs, the estimate for regressors)."""
    if arr.ndim == 0:
        return [float(arr)]
    rows = arr.reshape(arr.shape[0], -1)
    if rows.shape[1] > 1:
        return [float(i) for i in rows.argmax(axis=1)]
    return [float(v) for v in rows[:, 0]]


def task_of(config: mc.ModelConfig) -> str | None:
    """classification when the first output has several columns or an integer
    type; regression for one float column; None when there is no output."""
    if not config.output:
        return None
    t = config.output[0]
    dims = [d for d in t.dims]
    width = 1
    for d in dims:
        width *= max(d, 1)
    floats = t.data_type in (mc.TYPE_FP16, mc.TYPE_FP32, mc.TYPE_FP64, mc.TYPE_BF16)
    return "classification" if width > 1 or not floats else "regression"


# ---- the live monitor --------------------------------------------------------------


class DriftMonitor:
    """The windows of one version. observe() runs on instance worker threads;
    report() and the predictions map on the event loop."""

    def __init__(
        self,
        config: mc.ModelConfig,
        tensors: Sequence[TensorProfile],
        baseline: Mapping[str, float],
    ) -> None:
        seconds = float(config_param(config, "drift_window_seconds") or DEFAULT_WINDOW_SECONDS)
        panes = int(config_param(config, "drift_panes") or DEFAULT_PANES)
        if seconds <= 0 or panes < 1:
            raise ProfileError("drift_window_seconds must be > 0 and drift_panes >= 1")
        self.window_seconds = seconds
        self.panes = panes
        pane_ns = int(seconds * 1e9 / panes)
        self.tensors = list(tensors)
        self.windows: dict[tuple[bool, str], _core.DriftWindow] = {}
        for tp in self.tensors:
            assert tp.profile is not None
            self.windows[(tp.output, tp.name)] = _core.DriftWindow(tp.profile, 0, pane_ns, panes)
        self._inputs = [
            (tp.name, self.windows[(False, tp.name)]) for tp in tensors if not tp.output
        ]
        self._outputs = [(tp.name, self.windows[(True, tp.name)]) for tp in tensors if tp.output]
        self._output_names = [o.name for o in config.output]
        task = task_of(config)
        self.quality = Quality(task, dict(baseline)) if task is not None else None
        self.predictions: collections.OrderedDict[str, list[float]] = collections.OrderedDict()
        self._errors = 0
        self._lock = threading.Lock()  # the error counter only

    # worker threads
    def observe(self, feeds: Mapping[str, Array], results: Sequence[Array]) -> None:
        now = _core.monotonic_ns()
        try:
            for name, window in self._inputs:
                arr = feeds.get(name)
                if arr is not None:
                    window.update(as_matrix(arr), now)
            if self._outputs:
                by_name = dict(zip(self._output_names, results, strict=False))
                for name, window in self._outputs:
                    arr = by_name.get(name)
                    if arr is not None:
                        window.update(as_matrix(arr), now)
        except Exception as exc:  # a batch the profile cannot take (e.g. a rank change)
            with self._lock:
                self._errors += 1
                first = self._errors == 1
            if first:  # once: a stream of the same error must not flood the log
                log.warning("drift window update failed (batch left out): %s", exc)

    # event loop
    def remember(self, request_id: str, outputs: Mapping[str, Array]) -> None:
        if not request_id or not self._output_names:
            return
        first = outputs.get(self._output_names[0])
        if first is None:
            return
        self.predictions[request_id] = prediction_of(first)
        self.predictions.move_to_end(request_id)
        while len(self.predictions) > PREDICTIONS_KEPT:
            self.predictions.popitem(last=False)

    def feedback(self, request_id: str, truth: Sequence[float]) -> bool:
        """Counts ground truth for a remembered request; False for an id it does
        not remember. A wrong number of values is the caller's error, not an
        unknown id: it raises InvalidArgumentError naming the id."""
        predicted = self.predictions.get(request_id)
        if predicted is None or self.quality is None:
            return False
        if len(truth) != len(predicted):
            raise InvalidArgumentError(
                f"feedback for request id {request_id!r}: {len(truth)} value(s) for "
                f"{len(predicted)} predicted row(s); give one value per row of the request"
            )
        for p, t in zip(predicted, truth, strict=True):
            self.quality.add(p, t)
        return True

    def statistics(self) -> list[tuple[TensorProfile, _core.DriftReport]]:
        now = _core.monotonic_ns()
        return [
            (tp, self.windows[(tp.output, tp.name)].statistics(None, now)) for tp in self.tensors
        ]

    def report(self) -> dict[str, Any]:
        result: dict[str, Any] = {
            "available": True,
            "reason": "",
            "window_seconds": self.window_seconds,
            "panes": self.panes,
            "inputs": None,
            "outputs": None,
        }
        for tp, rep in self.statistics():
            key = "outputs" if tp.output else "inputs"
            window = self.windows[(tp.output, tp.name)]
            result[key] = merge_reports(result[key], tensor_report(tp, rep, window))
        result["quality"] = self.quality_report()
        return result

    def quality_report(self) -> dict[str, Any]:
        if self.quality is None:
            return {"available": False, "reason": "the model has no output"}
        degraded, why = self.quality.degraded()
        return {
            "available": True,
            "task": self.quality.task,
            "labelled": len(self.quality.errors),
            "metrics": self.quality.metrics(),
            "baseline": dict(self.quality.baseline),
            "degraded": degraded,
            "reason": why,
        }


def create_monitor(
    version_dir: Path, config: mc.ModelConfig, baseline: Mapping[str, Any] | None
) -> DriftMonitor | None:
    """The monitor of a version, or None when it has no profile. Raises
    ProfileError (or the core's error) for a profile that does not fit."""
    tensors = load(version_dir)
    if tensors is None:
        return None
    inputs, outputs = layout(config)
    shapes = {(t.output, t.name): len(t.features) for t in (*inputs, *outputs)}
    for tp in tensors:
        if shapes.get((tp.output, tp.name)) != len(tp.features):
            raise ProfileError(
                f"the drift profile's {'output' if tp.output else 'input'} '{tp.name}' does "
                "not match the model's signature; rerun sluice profile"
            )
    metrics = {
        k: float(v)
        for k, v in (baseline or {}).items()
        if k in ("accuracy", "mae", "rmse") and isinstance(v, int | float)
    }
    return DriftMonitor(config, tensors, metrics)
