"""Offline model transformations with onnxruntime's own tools (for `sluice package`).

Each function reads one model file and writes another; none changes its input.

Portability of graph optimisation. onnxruntime's levels are:

* basic: semantics-preserving rewrites done before the graph is split between
  execution providers (constant folding, redundant node removal, simple
  fusions into standard ONNX ops). The result is a plain ONNX graph that any
  runtime and provider can run: the one level that is safe to store.
* extended: fusions done after partitioning, only for nodes assigned to the
  CPU/CUDA providers, into onnxruntime's contrib ops (com.microsoft FusedConv,
  Gelu, Attention, ...): the stored graph then needs onnxruntime with those
  kernels, and loses on a device whose provider (NNAPI, CoreML, XNNPACK)
  lacks them.
* all (layout): adds NCHWc layout transforms whose block size follows the
  packaging machine's vector width (AVX2 8, AVX-512 16 floats): the stored
  graph is tied to that CPU and cannot run on ARM at all. onnxruntime's own
  ORT-format converter disables NchwcTransformer for that reason.

So bundles store `basic` by default; `extended` is offered for a bundle that
will run on onnxruntime's CPU provider only, and `all` is never stored.
"""

from __future__ import annotations

import contextlib
import gc
import io
import logging
import tempfile
import warnings
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

Array = np.ndarray[Any, Any]
log = logging.getLogger(__name__)

OPTIMIZATION_LEVELS = {
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
}
# Dynamic quantisation targets the weight-heavy ops only: on convolutions it
# produces ConvInteger, which most providers lack and which is slower on CPUs.
DYNAMIC_OP_TYPES = ("MatMul", "Gemm", "Attention", "LSTM", "GRU", "Gather")
# Static quantisation targets the compute-heavy ops only. Quantising every op
# onnxruntime can (Add, Mul, Concat, softmax pieces, ...) adds a requantisation
# at each of them; on graphs with normalisations or attention-like parts that
# error compounds (a published file-type classifier kept 6 % of its answers).
STATIC_OP_TYPES = ("Conv", "ConvTranspose", "MatMul", "Gemm")
ORT_FORMAT_SUFFIX = ".ort"


def onnxruntime_version() -> str:
    return str(ort.__version__)


def session(path: Path, threads: int | None = None) -> ort.InferenceSession:
    """A plain onnxruntime CPU session on the file, as a device would create it."""
    so = ort.SessionOptions()
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"])


def optimize(src: Path, dst: Path, level: str) -> None:
    """Writes onnxruntime's optimised graph at `level` (see the module docstring)."""
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.graph_optimization_level = OPTIMIZATION_LEVELS[level]
    so.optimized_model_filepath = str(dst)
    ort.InferenceSession(str(src), sess_options=so, providers=["CPUExecutionProvider"])


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    # The quantisation tools print advice and progress to stdout and the root
    # logger; a CLI whose stdout is the user's must keep it clean.
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        root.setLevel(level)


def _preprocessed(src: Path, workdir: Path) -> Path:
    """onnxruntime's recommended pre-processing before quantisation (shape
    inference and a basic optimisation); the model as is when it fails."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    out = workdir / "preprocessed.onnx"
    try:
        with _quiet():
            quant_pre_process(str(src), str(out), skip_symbolic_shape=True)
    except Exception as exc:  # symbolic shape inference rejects some graphs
        log.info("quantisation pre-processing skipped: %s", exc)
        return src
    return out


def quantize_dynamic(src: Path, dst: Path, *, per_channel: bool) -> None:
    """Int8 weights, activations quantised at run time (weight-heavy graphs)."""
    from onnxruntime.quantization import QuantType
    from onnxruntime.quantization import quantize_dynamic as ort_quantize_dynamic

    with tempfile.TemporaryDirectory() as tmp:
        model = _preprocessed(src, Path(tmp))
        with _quiet():
            ort_quantize_dynamic(
                str(model),
                str(dst),
                op_types_to_quantize=list(DYNAMIC_OP_TYPES),
                per_channel=per_channel,
                weight_type=QuantType.QInt8,
            )


def quantize_static(
    src: Path,
    dst: Path,
    calibration: Iterable[Mapping[str, Array]],
    *,
    per_channel: bool,
    method: str,
) -> None:
    """Static int8 in the QDQ format (QuantizeLinear/DequantizeLinear pairs, which
    every provider understands), activation ranges from the calibration batches."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
    )
    from onnxruntime.quantization import quantize_static as ort_quantize_static

    batches = iter(calibration)

    class Reader(CalibrationDataReader):  # type: ignore[misc]
        def get_next(self) -> dict[str, Array] | None:
            batch = next(batches, None)
            return None if batch is None else dict(batch)

    methods = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile}
    with tempfile.TemporaryDirectory() as tmp:
        model = _preprocessed(src, Path(tmp))
        with _quiet():
            ort_quantize_static(
                str(model),
                str(dst),
                Reader(),
                quant_format=QuantFormat.QDQ,
                op_types_to_quantize=list(STATIC_OP_TYPES),
                per_channel=per_channel,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                calibrate_method=methods[method],
                extra_options={"CalibTensorRangeSymmetric": False},
            )


def to_fp16(src: Path, dst: Path) -> None:
    """Float weights and compute in fp16, inputs and outputs kept float32 (so a
    client sends what it sent before). onnxruntime ships the converter."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = onnx.load(str(src))
    with _quiet():
        converted = convert_float_to_float16(model, keep_io_types=True)
    onnx.save(converted, str(dst))


def fix_batch(src: Path, dst: Path, batch: int) -> list[str]:
    """Fixes the first dim of every input to `batch` (mobile bundles run batch 1:
    static shapes let the runtime plan memory once). Returns the inputs fixed."""
    from onnxruntime.tools.onnx_model_utils import fix_output_shapes, make_input_shape_fixed

    model = onnx.load(str(src))
    fixed: list[str] = []
    initializers = {i.name for i in model.graph.initializer}
    for value in model.graph.input:
        if value.name in initializers or not value.type.HasField("tensor_type"):
            continue
        dims = value.type.tensor_type.shape.dim
        if not dims or dims[0].HasField("dim_value"):
            continue
        shape = [batch] + [d.dim_value if d.HasField("dim_value") else -1 for d in list(dims)[1:]]
        if any(d < 0 for d in shape):
            # Other dims stay dynamic: only the batch dim is replaced.
            first = dims[0]
            if first.HasField("dim_param"):
                from onnxruntime.tools.onnx_model_utils import make_dim_param_fixed

                make_dim_param_fixed(model.graph, first.dim_param, batch)
            else:
                first.Clear()
                first.dim_value = batch
        else:
            make_input_shape_fixed(model.graph, value.name, shape)
        fixed.append(value.name)
    with contextlib.suppress(Exception):  # output shapes are informative only
        fix_output_shapes(model)
    onnx.save(model, str(dst))
    return fixed


def to_ort_format(src: Path, dst: Path, ops_config: Path, level: str) -> None:
    """Converts to the ORT format (what a minimal onnxruntime build loads) the way
    onnxruntime's convert_onnx_models_to_ort does, at a portable level, and
    writes the required-operators config for a reduced build with onnxruntime's
    generator. The config names the model by its bundle path only."""
    from onnxruntime.tools.ort_format_model.utils import create_config_from_models

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.graph_optimization_level = OPTIMIZATION_LEVELS[level]
    so.optimized_model_filepath = str(dst)
    so.add_session_config_entry("session.save_model_format", "ORT")
    # As the converter does for non-ARM targets: keep QDQ int8 ops portable.
    so.add_session_config_entry("session.qdqisint8allowed", "0")
    ort.InferenceSession(str(src), sess_options=so, providers=["CPUExecutionProvider"])
    with tempfile.TemporaryDirectory() as tmp:
        generated = Path(tmp) / "required_operators.config"
        quiet = logging.getLogger("ort_format_model.utils")
        saved_level = quiet.level
        quiet.setLevel(logging.WARNING)
        try:
            # onnxruntime's OrtFormatModelProcessor reads the model with an
            # unclosed open(); collect that file object here, its warning muted,
            # rather than let a ResourceWarning surface later somewhere else.
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ResourceWarning)
                create_config_from_models([dst], generated, False)
                gc.collect()
        finally:
            quiet.setLevel(saved_level)
        # The generator names the model by its absolute path in a comment.
        lines = [
            line
            for line in generated.read_text(encoding="utf-8").splitlines()
            if not line.startswith("#")
        ]
    ops_config.write_text(
        f"# Generated by sluice package from {dst.name} with onnxruntime {ort.__version__}\n"
        + "\n".join(lines)
        + "\n",
        encoding="utf-8",
    )


def operators_from_config(ops_config: Path) -> dict[str, list[str]]:
    """`domain;opset` -> operator names, from a required-operators config."""
    found: dict[str, list[str]] = {}
    for line in ops_config.read_text(encoding="utf-8").splitlines():
        if not line or line.startswith("#"):
            continue
        domain, opset, ops = line.split(";", 2)
        found[f"{domain or 'ai.onnx'};{opset}"] = sorted(o for o in ops.split(",") if o)
    return found


def graph_summary(path: Path) -> dict[str, Any]:
    """Opsets and operator counts of an ONNX file (subgraphs included)."""
    model = onnx.load(str(path), load_external_data=False)
    counts: Counter[str] = Counter()

    def walk(graph: onnx.GraphProto) -> None:
        for node in graph.node:
            counts[f"{node.domain or 'ai.onnx'}:{node.op_type}"] += 1
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    walk(attr.g)
                for g in attr.graphs:
                    walk(g)

    walk(model.graph)
    return {
        "opsets": {(o.domain or "ai.onnx"): int(o.version) for o in model.opset_import},
        "operators": dict(sorted(counts.items())),
    }


def weight_bytes(path: Path) -> dict[str, int]:
    """Initializer bytes, split by whether a MatMul/Gemm/Gather consumes them:
    the weight-heavy share that dynamic quantisation shrinks."""
    model = onnx.load(str(path), load_external_data=False)
    sizes = {
        t.name: int(np.prod(t.dims, dtype=np.int64))
        * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
        for t in model.graph.initializer
    }
    dense = {
        name
        for node in model.graph.node
        if node.op_type in DYNAMIC_OP_TYPES
        for name in node.input
        if name in sizes
    }
    return {
        "total": sum(sizes.values()),
        "dense": sum(v for k, v in sizes.items() if k in dense),
    }
