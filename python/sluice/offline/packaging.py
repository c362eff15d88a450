"""`sluice package`: a registry version as a self-describing bundle for a device,
proven to answer like the original before anything is written as final.

The bundle is a model folder, so its parent is a one-model repository that
`sluice serve` serves::

    OUT/config.pbtxt              what the server and `sluice batch` complete from
    OUT/manifest.json             source, lineage, signature of the graph, steps,
                                  sizes, validation, batch-1 latency, machine
    OUT/required_operators.config operators a reduced onnxruntime build needs
    OUT/validation_sample.npz     held-out inputs and the original's outputs
    OUT/<version>/model.onnx|ort  the packaged model (+ metadata.json, drift profile)
    OUT/SHA256SUMS[.sig]          see sluice.offline.bundle
    OUT.tar.gz                    the same folder, for shipping

Everything is built in a staging folder beside OUT and renamed into place only
after the validation gate passed; a refused package leaves nothing at OUT.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from google.protobuf import text_format

from sluice import __version__, datatypes
from sluice import config as cfg
from sluice.errors import SluiceError
from sluice.monitoring import drift
from sluice.offline import bundle
from sluice.proto import model_config_pb2 as mc
from sluice.repository import layout
from sluice.repository.registry.folders import check_model_name
from sluice.repository.registry.metadata import read_metadata
from sluice.runtime import RuntimeOptions, available_cores, load_runtime, transform

Array = np.ndarray[Any, Any]
log = logging.getLogger(__name__)

BUNDLE_FORMAT = "sluice-bundle/1"
SAMPLE_FILENAME = "validation_sample.npz"
OPS_CONFIG_FILENAME = "required_operators.config"
CONFIG_FILENAME = "config.pbtxt"
DEFAULT_MIN_AGREEMENT = 0.99
# Non-classifier outputs pass when their mean absolute error is at most this
# share of the reference's standard deviation (or --max-mean-abs-error).
DEFAULT_RELATIVE_ERROR = 0.05
DEFAULT_VALIDATION_ROWS = 256
GENERATED_ROWS = 64
SAMPLE_ROWS = 32
GENERATED_DYNAMIC_DIM = 32
# A weight-heavy graph: dense-layer weights are most of a sizeable model.
WEIGHT_HEAVY_BYTES = 256 * 1024
WEIGHT_HEAVY_SHARE = 0.5
LATENCY_RUNS = 200
LATENCY_BUDGET_S = 2.0
VALIDATION_CHUNK_ROWS = 64


class PackageError(SluiceError):
    """The package cannot be built, or the validation gate refused it."""


@dataclasses.dataclass(frozen=True)
class Profile:
    """What a target device wants. Each field is a step the user may override."""

    name: str
    description: str
    optimize: str  # none | basic | extended
    quantize: str  # auto | none | dynamic | static
    fp16: bool
    format: str  # onnx | ort
    fixed_batch: int  # 0: keep the batch dim dynamic


PROFILES = {
    p.name: p
    for p in (
        Profile(
            "server-cpu",
            "a server CPU running full onnxruntime: portable graph optimisation, int8 "
            "where it pays (static QDQ with calibration data, dynamic for weight-heavy "
            "graphs), dynamic batch, ONNX format",
            "basic",
            "auto",
            False,
            "onnx",
            0,
        ),
        Profile(
            "mobile",
            "a phone or embedded board with a reduced (minimal) onnxruntime build: ORT "
            "format with its operator list, int8 as for server-cpu, batch fixed to 1",
            "basic",
            "auto",
            False,
            "ort",
            1,
        ),
        Profile(
            "gpu-fp16",
            "a GPU: float16 weights and compute (inputs and outputs stay float32), "
            "no int8, dynamic batch, ONNX format",
            "basic",
            "none",
            True,
            "onnx",
            0,
        ),
    )
}


@dataclasses.dataclass(frozen=True)
class PackageOptions:
    repository: Path
    model: str
    version: int
    output: Path
    profile: Profile
    calibration: Path | None = None
    validation: Path | None = None
    min_agreement: float = DEFAULT_MIN_AGREEMENT
    max_mean_abs_error: float | None = None
    validation_rows: int = DEFAULT_VALIDATION_ROWS
    per_channel: bool = False
    calibration_method: str = "minmax"
    sign_key: Path | None = None
    force: bool = False
    tarball: bool = True
    latency_budget_s: float = LATENCY_BUDGET_S


@dataclasses.dataclass(frozen=True)
class Packaged:
    path: Path
    tarball: Path | None
    manifest: dict[str, Any]
    notes: tuple[str, ...]


# ---- data -------------------------------------------------------------------------


def _read(path: Path, config: mc.ModelConfig) -> dict[str, Array]:
    from sluice.cli.drift import DriftCliError, read_data

    try:
        data = read_data(path, config)
    except DriftCliError as exc:
        raise PackageError(str(exc)) from None
    missing = [t.name for t in config.input if t.name not in data]
    if missing:
        raise PackageError(f"{path.name} has no array for input(s) {', '.join(missing)}")
    rows = {a.shape[0] for a in data.values()}
    if len(rows) != 1 or 0 in rows:
        raise PackageError(f"{path.name}: the arrays must have the same, non-zero number of rows")
    return data


def _generated(config: mc.ModelConfig, rows: int) -> dict[str, Array]:
    rng = np.random.default_rng(0)
    feeds: dict[str, Array] = {}
    for t in config.input:
        dt = datatypes.BY_CONFIG[mc.DataType.Name(t.data_type)]
        dims = list(t.reshape.shape) if t.HasField("reshape") else list(t.dims)
        shape = [rows] + [d if d > 0 else GENERATED_DYNAMIC_DIM for d in dims]
        if dt.is_bytes or dt.numpy is None:
            raise PackageError(f"input '{t.name}' is {dt.wire}: give --validation DATA")
        if dt.numpy.kind == "f":
            feeds[t.name] = rng.standard_normal(shape).astype(dt.numpy)
        elif dt.numpy.kind == "b":
            feeds[t.name] = rng.integers(0, 2, size=shape).astype(bool)
        else:
            feeds[t.name] = rng.integers(0, 10, size=shape).astype(dt.numpy)
    return feeds


def _rows(data: Mapping[str, Array]) -> int:
    return int(next(iter(data.values())).shape[0])


def _head(data: Mapping[str, Array], rows: int) -> dict[str, Array]:
    return {k: np.ascontiguousarray(v[:rows]) for k, v in data.items()}


def _batches(data: Mapping[str, Array], rows: int) -> Iterator[dict[str, Array]]:
    for start in range(0, _rows(data), rows):
        yield {k: v[start : start + rows] for k, v in data.items()}


# ---- running the packaged model --------------------------------------------------


def run_plain(path: Path, data: Mapping[str, Array], outputs: list[str]) -> dict[str, Array]:
    """The model file's outputs in plain onnxruntime, in chunks (row by row when
    the packaged graph has a fixed batch of 1)."""
    session = transform.session(path)
    fixed = {}
    for i in session.get_inputs():
        first = i.shape[0] if i.shape else None
        fixed[i.name] = first if isinstance(first, int) and first > 0 else None
    step = min((v for v in fixed.values() if v), default=VALIDATION_CHUNK_ROWS)
    names = {i.name for i in session.get_inputs()}
    parts: list[list[Array]] = []
    for chunk in _batches(data, step):
        parts.append(session.run(outputs, {k: v for k, v in chunk.items() if k in names}))
    return {n: np.concatenate([p[i] for p in parts]) for i, n in enumerate(outputs)}


def _is_classifier(arr: Array) -> bool:
    return arr.dtype.kind == "f" and arr.ndim == 2 and arr.shape[1] > 1


def compare(
    reference: Mapping[str, Array],
    candidate: Mapping[str, Array],
    min_agreement: float,
    max_mean_abs_error: float | None,
) -> dict[str, Any]:
    """Per output: top-1 agreement (class scores), exact agreement (integer
    outputs), and max/mean absolute error; `passed` against the thresholds."""
    results: dict[str, Any] = {}
    for name, ref in reference.items():
        got = candidate[name]
        entry: dict[str, Any] = {}
        if got.shape != ref.shape:
            results[name] = {"passed": False, "reason": f"shape {got.shape} != {ref.shape}"}
            continue
        if ref.dtype.kind in "iub":
            entry["kind"] = "labels"
            entry["agreement"] = float(np.mean(np.all((got == ref).reshape(len(ref), -1), 1)))
            entry["min_agreement"] = min_agreement
            entry["passed"] = entry["agreement"] >= min_agreement
        else:
            diff = np.abs(got.astype(np.float64) - ref.astype(np.float64))
            entry["max_abs_error"] = float(diff.max()) if diff.size else 0.0
            entry["mean_abs_error"] = float(diff.mean()) if diff.size else 0.0
            if _is_classifier(ref):
                entry["kind"] = "classifier"
                entry["agreement"] = float(np.mean(got.argmax(1) == ref.argmax(1)))
                entry["min_agreement"] = min_agreement
                entry["passed"] = entry["agreement"] >= min_agreement
            else:
                entry["kind"] = "values"
                limit = max_mean_abs_error
                if limit is None:
                    limit = DEFAULT_RELATIVE_ERROR * float(np.std(ref.astype(np.float64))) + 1e-6
                entry["max_mean_abs_error"] = limit
                entry["passed"] = entry["mean_abs_error"] <= limit
        results[name] = entry
    return results


def describe_comparison(results: Mapping[str, Any]) -> str:
    parts = []
    for name, r in results.items():
        if "agreement" in r:
            parts.append(f"'{name}': agreement {r['agreement']:.4f} (need >= {r['min_agreement']})")
        elif "mean_abs_error" in r:
            parts.append(
                f"'{name}': mean abs error {r['mean_abs_error']:.3g} "
                f"(need <= {r['max_mean_abs_error']:.3g}), max {r['max_abs_error']:.3g}"
            )
        else:
            parts.append(f"'{name}': {r.get('reason', 'failed')}")
    return "; ".join(parts)


def latency_batch1(path: Path, data: Mapping[str, Array], budget_s: float) -> dict[str, Any]:
    """Batch-1 latency on this machine: median and p90 of up to LATENCY_RUNS runs
    within `budget_s` (at least 5 runs), after warm-up."""
    session = transform.session(path)
    names = {i.name for i in session.get_inputs()}
    feeds = {k: np.ascontiguousarray(v[:1]) for k, v in data.items() if k in names}
    for _ in range(3):
        session.run(None, feeds)
    samples_ns: list[int] = []
    deadline_ns = time.monotonic_ns() + int(budget_s * 1e9)
    while len(samples_ns) < 5 or (
        len(samples_ns) < LATENCY_RUNS and time.monotonic_ns() < deadline_ns
    ):
        start = time.monotonic_ns()
        session.run(None, feeds)
        samples_ns.append(time.monotonic_ns() - start)
    arr = np.array(samples_ns, dtype=np.float64) / 1e3
    return {
        "batch_size": 1,
        "runs": len(samples_ns),
        "p50_us": round(float(np.percentile(arr, 50)), 1),
        "p90_us": round(float(np.percentile(arr, 90)), 1),
        "intra_op_threads": session.get_session_options().intra_op_num_threads or available_cores(),
    }


def machine() -> dict[str, Any]:
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "architecture": platform.machine(),
        "cores_available": available_cores(),
        "logical_cpus": os.cpu_count(),
        "system": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "onnxruntime": transform.onnxruntime_version(),
    }


# ---- steps -----------------------------------------------------------------------


@dataclasses.dataclass
class _Step:
    name: str
    applied: bool
    params: dict[str, Any]
    reason: str = ""
    size_bytes: int = 0
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _choose_quantization(
    wanted: str, source: Path, has_calibration: bool, fp16: bool
) -> tuple[str, str]:
    """The quantisation to apply and why."""
    if wanted == "static" and not has_calibration:
        raise PackageError("static quantisation needs --calibration DATA")
    if wanted in ("static", "dynamic"):
        if fp16:
            raise PackageError("int8 quantisation and --fp16 exclude each other; pick one")
        return wanted, "asked for"
    if wanted == "none" or fp16:
        return "none", "not asked for" if wanted == "none" else "fp16 instead"
    if has_calibration:
        return "static", "calibration data given"
    weights = transform.weight_bytes(source)
    heavy = weights["dense"] >= WEIGHT_HEAVY_BYTES and weights["dense"] >= WEIGHT_HEAVY_SHARE * max(
        1, weights["total"]
    )
    if heavy:
        return "dynamic", (
            f"weight-heavy graph ({weights['dense']} of {weights['total']} weight bytes "
            "in dense layers)"
        )
    return "none", (
        f"no calibration data and not weight-heavy ({weights['dense']} of "
        f"{weights['total']} weight bytes in dense layers): give --calibration for static int8"
    )


def _run_steps(
    options: PackageOptions,
    source: Path,
    workdir: Path,
    calibration: Mapping[str, Array] | None,
) -> tuple[Path, list[_Step], list[str]]:
    try:
        return _steps(options, source, workdir, calibration)
    except PackageError:
        raise
    except Exception as exc:  # onnx and onnxruntime's tools raise many types
        raise PackageError(
            f"a packaging step failed in onnxruntime's tools: {type(exc).__name__}: {exc}"
        ) from exc


def _steps(
    options: PackageOptions,
    source: Path,
    workdir: Path,
    calibration: Mapping[str, Array] | None,
) -> tuple[Path, list[_Step], list[str]]:
    profile = options.profile
    steps: list[_Step] = []
    notes: list[str] = []
    current = source

    def record(step: _Step, path: Path, start_ns: int) -> None:
        step.size_bytes = path.stat().st_size
        step.seconds = round((time.monotonic_ns() - start_ns) / 1e9, 3)
        steps.append(step)

    start = time.monotonic_ns()
    if profile.fixed_batch:
        out = workdir / "fixed.onnx"
        fixed = transform.fix_batch(current, out, profile.fixed_batch)
        current = out
        record(
            _Step("fix_batch", bool(fixed), {"batch": profile.fixed_batch, "inputs": fixed}),
            current,
            start,
        )
    else:
        steps.append(_Step("fix_batch", False, {}, "dynamic batch kept"))

    start = time.monotonic_ns()
    if profile.optimize == "none":
        steps.append(_Step("optimize", False, {}, "not asked for"))
    else:
        out = workdir / "optimized.onnx"
        transform.optimize(current, out, profile.optimize)
        current = out
        reason = "portable: plain ONNX operators only"
        if profile.optimize == "extended":
            reason = "contrib fused operators: needs onnxruntime's CPU/CUDA kernels on the device"
        record(_Step("optimize", True, {"level": profile.optimize}, reason), current, start)

    start = time.monotonic_ns()
    kind, why = _choose_quantization(
        profile.quantize, current, calibration is not None, profile.fp16
    )
    if kind != "none" and options.per_channel:
        opset = transform.graph_summary(current)["opsets"].get("ai.onnx", 0)
        if opset < 13:
            raise PackageError(
                f"--per-channel needs opset >= 13 (per-axis QuantizeLinear); the model has "
                f"opset {opset}: quantise per tensor, or convert the model to opset 13 first"
            )
    if kind == "dynamic":
        out = workdir / "quantized.onnx"
        transform.quantize_dynamic(current, out, per_channel=options.per_channel)
        current = out
        params = {
            "mode": "dynamic",
            "weights": "int8",
            "op_types": list(transform.DYNAMIC_OP_TYPES),
            "per_channel": options.per_channel,
        }
        record(_Step("quantize", True, params, why), current, start)
    elif kind == "static":
        assert calibration is not None
        out = workdir / "quantized.onnx"
        batch = 1 if profile.fixed_batch else 16
        transform.quantize_static(
            current,
            out,
            _batches(calibration, batch),
            per_channel=options.per_channel,
            method=options.calibration_method,
        )
        current = out
        params = {
            "mode": "static",
            "format": "QDQ",
            "weights": "int8",
            "activations": "uint8",
            "calibration_rows": _rows(calibration),
            "calibration_method": options.calibration_method,
            "per_channel": options.per_channel,
        }
        record(_Step("quantize", True, params, why), current, start)
    else:
        steps.append(_Step("quantize", False, {}, why))
        if profile.quantize == "auto":
            notes.append(f"no int8 quantisation: {why}")

    start = time.monotonic_ns()
    if profile.fp16:
        out = workdir / "fp16.onnx"
        transform.to_fp16(current, out)
        current = out
        record(_Step("fp16", True, {"keep_io_types": True}, "asked for"), current, start)
    else:
        steps.append(_Step("fp16", False, {}, "not asked for"))
    return current, steps, notes


# ---- the package command -------------------------------------------------------


def _source(options: PackageOptions) -> tuple[mc.ModelConfig, mc.ModelConfig, Path, Any]:
    """(config file as written, completed config, model file, runtime)."""
    check_model_name(options.model)
    model_dir = options.repository / options.model
    if not model_dir.is_dir():
        raise PackageError(f"no model '{options.model}' in {options.repository}")
    written, _ = cfg.read_config_file(model_dir)
    cfg.validate_static(written, options.model)
    version_dir = model_dir / str(options.version)
    if not version_dir.is_dir():
        raise PackageError(f"model '{options.model}' has no version {options.version}")
    completed = mc.ModelConfig()
    completed.CopyFrom(written)
    path = cfg.model_file(model_dir, options.version, completed)
    runtime, _ = load_runtime(path, completed, options.model, RuntimeOptions())
    return written, completed, path, runtime


def _bundle_config(written: mc.ModelConfig, profile: Profile, filename: str) -> mc.ModelConfig:
    """The bundle's config: the source's settings (instances, batching, parameters)
    with the tensors left to completion from the packaged graph, whose shapes
    may differ (a fixed batch)."""
    config = mc.ModelConfig()
    config.CopyFrom(written)
    config.ClearField("name")  # the bundle folder's name is the model name
    config.ClearField("input")
    config.ClearField("output")
    config.ClearField("model_warmup")  # its data files are not copied
    if profile.fixed_batch:
        config.max_batch_size = 0
        if config.WhichOneof("scheduling_choice") == "dynamic_batching":
            config.ClearField("dynamic_batching")
    config.default_model_filename = filename
    return config


def package(options: PackageOptions) -> Packaged:
    """Builds, validates and writes the bundle (see the module docstring)."""
    if not 0.0 <= options.min_agreement <= 1.0:
        raise PackageError(f"--min-agreement must be in [0, 1], not {options.min_agreement}")
    if options.validation_rows < 1:
        raise PackageError("--validation-rows must be >= 1")
    out = options.output
    if out.exists() and not options.force:
        raise PackageError(f"{out} exists; remove it or give --force")
    if options.sign_key is not None:
        key_id = bundle.public_key_id(options.sign_key)  # fail early on a bad key
    written, config, source_path, runtime = _source(options)
    outputs = [o.name for o in config.output]
    notes: list[str] = []

    calibration = _read(options.calibration, config) if options.calibration else None
    if options.validation is not None:
        validation, origin = _read(options.validation, config), "validation file"
    elif calibration is not None:
        validation, origin = calibration, "calibration file (not held out)"
        notes.append("validating on the calibration set: give --validation for held-out data")
    else:
        validation, origin = _generated(config, GENERATED_ROWS), "generated (random inputs)"
        notes.append(
            "WARNING: no --validation or --calibration data: the gate compares the models on "
            f"{GENERATED_ROWS} RANDOM inputs, which says little about real inputs"
        )
    validation = _head(validation, options.validation_rows)

    from sluice.cli.drift import run_model

    reference = run_model(runtime, config, validation)
    version_dir = source_path.parent
    metadata = read_metadata(version_dir) or {}

    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.staging-", dir=out.parent))
    try:
        with tempfile.TemporaryDirectory() as tmp:
            current, steps, step_notes = _run_steps(options, source_path, Path(tmp), calibration)
            notes += step_notes
            root = staging / out.name
            packaged_dir = root / str(options.version)
            packaged_dir.mkdir(parents=True)
            profile = options.profile
            start = time.monotonic_ns()
            if profile.format == "ort":
                filename = "model" + transform.ORT_FORMAT_SUFFIX
                transform.to_ort_format(
                    current,
                    packaged_dir / filename,
                    root / OPS_CONFIG_FILENAME,
                    "basic" if profile.optimize == "none" else profile.optimize,
                )
                step = _Step(
                    "ort_format",
                    True,
                    {"required_operators": OPS_CONFIG_FILENAME, "qdq_is_int8_allowed": False},
                    "for a reduced (minimal) onnxruntime build",
                )
            else:
                filename = cfg.DEFAULT_MODEL_FILENAME
                shutil.copyfile(current, packaged_dir / filename)
                step = _Step("ort_format", False, {}, "ONNX format kept")
            packaged = packaged_dir / filename
            if step.applied:
                step.size_bytes = packaged.stat().st_size
                step.seconds = round((time.monotonic_ns() - start) / 1e9, 3)
            steps.append(step)

            try:
                candidate = run_plain(packaged, validation, outputs)
            except Exception as exc:  # onnxruntime raises several types
                raise PackageError(
                    f"the packaged model does not run in onnxruntime on this machine: {exc}"
                ) from None
            results = compare(
                reference, candidate, options.min_agreement, options.max_mean_abs_error
            )
            if not all(r["passed"] for r in results.values()):
                raise PackageError(
                    f"validation gate refused the package ({_rows(validation)} rows, {origin}): "
                    + describe_comparison(results)
                    + "; nothing written. Try a milder profile (--quantize none), more or "
                    "better calibration data, or --per-channel"
                )
            graph = (
                _ort_graph_summary(current, root / OPS_CONFIG_FILENAME)
                if profile.format == "ort"
                else transform.graph_summary(packaged)
            )

            bundle_config = _bundle_config(written, profile, filename)
            (root / CONFIG_FILENAME).write_text(
                text_format.MessageToString(bundle_config), encoding="utf-8"
            )
            _check_servable(root, options.version)

            sample_rows = min(SAMPLE_ROWS, _rows(validation))
            sample = {
                f"input_{i}": validation[t.name][:sample_rows] for i, t in enumerate(config.input)
            }
            sample |= {f"reference_{i}": reference[n][:sample_rows] for i, n in enumerate(outputs)}
            with (root / SAMPLE_FILENAME).open("wb") as f:
                np.savez(f, **sample)  # type: ignore[arg-type]

            drift_files = _copy_drift_profile(version_dir, packaged_dir)
            latency = latency_batch1(packaged, validation, options.latency_budget_s)
            source_latency = latency_batch1(source_path, validation, options.latency_budget_s)
            sha = bundle.sha256_file(packaged)
            manifest: dict[str, Any] = {
                "format": BUNDLE_FORMAT,
                "model": options.model,
                "version": options.version,
                "profile": {"name": profile.name, **dataclasses.asdict(profile)},
                "created": datetime.datetime.now(datetime.timezone.utc).isoformat(
                    timespec="seconds"
                ),
                "sluice_version": __version__,
                "source": {
                    "model": options.model,
                    "version": options.version,
                    "file": source_path.name,
                    "sha256": bundle.sha256_file(source_path),
                    "size_bytes": source_path.stat().st_size,
                    "lineage": metadata,
                },
                "files": {
                    "model": f"{options.version}/{filename}",
                    "config": CONFIG_FILENAME,
                    "validation_sample": SAMPLE_FILENAME,
                    "required_operators": OPS_CONFIG_FILENAME if profile.format == "ort" else None,
                    "drift_profile": [f"{options.version}/{n}" for n in drift_files],
                },
                "model_file": {"format": profile.format, "sha256": sha},
                "inputs": [_tensor_json(t, config) for t in config.input],
                "outputs": [_tensor_json(t, config) for t in config.output],
                **graph,
                "steps": [s.to_json() for s in steps],
                "sizes": {
                    "source_bytes": source_path.stat().st_size,
                    "packaged_bytes": packaged.stat().st_size,
                    "ratio": round(packaged.stat().st_size / source_path.stat().st_size, 4),
                },
                "validation": {
                    "data": origin,
                    "rows": _rows(validation),
                    "sample_rows": sample_rows,
                    "outputs": results,
                    "input_names": [t.name for t in config.input],
                    "output_names": outputs,
                    "passed": True,
                },
                "latency": {"packaged": latency, "source": source_latency},
                "machine": machine(),
                "signature": {"algorithm": "ed25519", "public_key_sha256": key_id}
                if options.sign_key is not None
                else None,
                "notes": notes,
            }
            _write_version_metadata(packaged_dir, options, sha, manifest)
            (root / bundle.MANIFEST_FILENAME).write_text(
                json.dumps(manifest, indent=2, allow_nan=False) + "\n", encoding="utf-8"
            )
            sums = bundle.write_sums(root)
            if options.sign_key is not None:
                bundle.sign(root, sums, options.sign_key)
            bundle.fsync_tree(root)
            _move_into_place(root, out, options.force)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    tarball = None
    if options.tarball:
        tarball = out.with_name(out.name + ".tar.gz")
        bundle.write_tarball(out, tarball)
    return Packaged(out, tarball, manifest, tuple(notes))


def _ort_graph_summary(onnx_source: Path, ops_config: Path) -> dict[str, Any]:
    summary = transform.graph_summary(onnx_source)
    summary["operators_ort_format"] = transform.operators_from_config(ops_config)
    return summary


def _tensor_json(t: Any, config: mc.ModelConfig) -> dict[str, Any]:
    dims = list(t.dims)
    shape = ([-1] if config.max_batch_size > 0 else []) + dims
    return {
        "name": t.name,
        "datatype": datatypes.BY_CONFIG[mc.DataType.Name(t.data_type)].wire,
        "shape": shape,
    }


def _check_servable(root: Path, version: int) -> None:
    """The bundle loads as a model of a repository, as `sluice serve` loads it."""
    config, _ = cfg.read_config_file(root)
    cfg.validate_static(config, root.name)
    try:
        load_runtime(cfg.model_file(root, version, config), config, root.name, RuntimeOptions())
    except SluiceError as exc:
        raise PackageError(f"the bundle would not serve: {exc.message}") from None


def _copy_drift_profile(version_dir: Path, target: Path) -> list[str]:
    if not (version_dir / drift.MANIFEST_FILENAME).is_file():
        return []
    tensors = drift.load(version_dir) or []
    names = [drift.MANIFEST_FILENAME] + [tp.file for tp in tensors]
    for name in names:
        shutil.copyfile(version_dir / name, target / name)
    return names


def _write_version_metadata(
    packaged_dir: Path, options: PackageOptions, sha: str, manifest: Mapping[str, Any]
) -> None:
    """metadata.json of the bundle's version, so `sluice models` lists it with its
    lineage: the source version and the steps that made it."""
    metadata = {
        "version": options.version,
        "sha256": sha,
        "created": manifest["created"],
        "source": f"sluice package {options.model} {options.version} "
        f"--profile {options.profile.name}",
        "parent": None,
        "params": {s["name"]: json.dumps(s["params"]) for s in manifest["steps"] if s["applied"]},
        "metrics": (manifest["source"]["lineage"] or {}).get("metrics", {}),
        "tags": {
            "bundle_profile": options.profile.name,
            "source_sha256": manifest["source"]["sha256"],
        },
        "signature": (manifest["source"]["lineage"] or {}).get("signature"),
        "sluice_version": __version__,
    }
    (packaged_dir / layout.METADATA_FILENAME).write_text(
        json.dumps(metadata, indent=2, allow_nan=False) + "\n", encoding="utf-8"
    )


def _move_into_place(root: Path, out: Path, force: bool) -> None:
    old = None
    if out.exists():
        if not force:
            raise PackageError(f"{out} appeared while packaging; not replaced")
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
    os.replace(root, out)
    bundle.fsync_dir(out.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# ---- verify ----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Verified:
    ok: bool
    lines: tuple[str, ...]


def verify(root: Path, public_key: Path | None) -> Verified:
    """Checks a bundle: files against SHA256SUMS, the signature (with a key),
    the model in plain onnxruntime, and the stored validation sample."""
    lines: list[str] = []
    if root.is_file() and root.name.endswith(".tar.gz"):
        return _verify_tarball(root, public_key)
    if not root.is_dir():
        return Verified(False, (f"FAIL {root} is not a bundle folder",))
    try:
        sums, problems = bundle.check_sums(root)
    except bundle.BundleError as exc:
        return Verified(False, (f"FAIL checksums: {exc.message}",))
    if problems:
        return Verified(False, tuple(f"FAIL checksums: {p}" for p in problems))
    lines.append(f"ok   checksums: {len(sums.splitlines())} files match {bundle.SUMS_FILENAME}")
    signed = (root / bundle.SIGNATURE_FILENAME).is_file()
    if public_key is not None:
        try:
            bundle.check_signature(root, sums, public_key)
        except bundle.BundleError as exc:
            return Verified(False, (*lines, f"FAIL signature: {exc.message}"))
        lines.append(f"ok   signature: ed25519, key {public_key.name}")
    elif signed:
        lines.append("note signature present but not checked: give --key PUB")
    try:
        manifest = json.loads((root / bundle.MANIFEST_FILENAME).read_text(encoding="utf-8"))
        model_rel = manifest["files"]["model"]
        val = manifest["validation"]
        input_names, output_names = val["input_names"], val["output_names"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return Verified(False, (*lines, f"FAIL manifest: {exc}"))
    model_path = root / model_rel
    if Path(model_rel).is_absolute() or ".." in Path(model_rel).parts:
        return Verified(False, (*lines, "FAIL manifest: model path leaves the bundle"))
    try:
        transform.session(model_path)
        lines.append(f"ok   loads in onnxruntime {transform.onnxruntime_version()}: {model_rel}")
        with np.load(root / SAMPLE_FILENAME, allow_pickle=False) as z:
            inputs = {n: z[f"input_{i}"] for i, n in enumerate(input_names)}
            reference = {n: z[f"reference_{i}"] for i, n in enumerate(output_names)}
        got = run_plain(model_path, inputs, list(output_names))
    except Exception as exc:  # onnxruntime and numpy raise several types
        return Verified(False, (*lines, f"FAIL model: {exc}"))
    recorded = val["outputs"]
    min_agreement = min(
        (r["min_agreement"] for r in recorded.values() if "min_agreement" in r),
        default=DEFAULT_MIN_AGREEMENT,
    )
    limits = [r["max_mean_abs_error"] for r in recorded.values() if "max_mean_abs_error" in r]
    results = compare(reference, got, min_agreement, None)
    for name, r in results.items():
        if r.get("kind") == "values" and limits:
            r["max_mean_abs_error"] = recorded.get(name, {}).get("max_mean_abs_error", limits[0])
            r["passed"] = r["mean_abs_error"] <= r["max_mean_abs_error"]
    rows = len(next(iter(inputs.values())))
    verdict = "ok  " if all(r["passed"] for r in results.values()) else "FAIL"
    lines.append(f"{verdict} validation sample ({rows} rows): {describe_comparison(results)}")
    return Verified(verdict == "ok  ", tuple(lines))


def _verify_tarball(path: Path, public_key: Path | None) -> Verified:
    import tarfile

    with tempfile.TemporaryDirectory() as tmp, tarfile.open(path, "r:gz") as tar:
        members = tar.getmembers()
        tops = {Path(m.name).parts[0] for m in members if m.name}
        if len(tops) != 1:
            return Verified(False, (f"FAIL {path.name}: want one top-level folder",))
        if sys.version_info >= (3, 12):
            tar.extractall(tmp, filter="data")
        else:
            for m in members:
                if not (m.isfile() or m.isdir()) or m.name.startswith("/") or ".." in m.name:
                    return Verified(False, (f"FAIL {path.name}: unsafe member {m.name}",))
            tar.extractall(tmp)  # members checked above
        result = verify(Path(tmp) / tops.pop(), public_key)
    return Verified(result.ok, (f"note {path.name}: unpacked to check", *result.lines))
