"""Build the batching benchmark's model repository, deterministically.

Usage: ``python benchmarks/build_models.py [--out DIR] [--max-queue-delay-us 500]
[--intra-op-threads 1] [--slo-target-ms 20] [--wide-units 1536]``

Models (float32, symbolic batch dim ``N``):

* ``tiny_mlp``: x[N,64] -> 256 -> 256 -> y[N,10] (Relu between); ~13 us per call.
* ``wide_mlp``: x[N,512] -> four dense layers of ``--wide-units`` -> y[N,16]
  (Relu between). Weight-memory-bound at small batches: on the 2-core dev box
  (1 intra-op thread) 1536 units cost ~1.2 ms at batch 1, ~1.5 ms at batch 8 and
  ~3.7 ms at batch 32 (2048 units: 2.5 / 3.0 / 8.3 ms). See README.md.
* ``cnn``: x[N,3,64,64] -> 3 x (Conv 3x3 + Relu + MaxPool 2x2) with 16/32/64
  channels -> GlobalAveragePool -> Gemm -> y[N,10].

Each model gets two folders holding the same ``model.onnx``:
``<name>`` (max_batch_size 64, no dynamic_batching: every request runs alone)
and ``<name>_batched`` (max_batch_size 64, ``dynamic_batching { max_queue_delay_microseconds }``);
``wide_mlp`` also gets ``wide_mlp_slo`` (batched + the sluice ``slo_target_ms``
parameter). All use one CPU instance and ``intra_op_thread_count``.

Inputs and outputs are declared in every config on purpose: a config without
them is auto-completed, and auto-completion turns the dynamic batcher on.

Reruns are byte-identical: fixed seeds, pinned IR version / opset / producer,
deterministic serialization.
"""

from __future__ import annotations

import argparse
import itertools
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

BENCH_DIR = Path(__file__).resolve().parent
DEFAULT_OUT = BENCH_DIR / ".repo"

IR_VERSION = 8
OPSET = 17
PRODUCER_NAME = "sluice-bench"
PRODUCER_VERSION = "1"

MAX_BATCH_SIZE = 64
DEFAULT_DELAY_US = 500
DEFAULT_INTRA_OP = 1
DEFAULT_SLO_MS = "20"
# Chosen by measurement (see the module docstring): ~1-2 ms per call at batch 1.
DEFAULT_WIDE_UNITS = 1536
BASE_MODELS = ("tiny_mlp", "wide_mlp", "cnn")
SLO_MODELS = ("wide_mlp",)


@dataclass(frozen=True)
class Tensor:
    name: str
    dims: tuple[int, ...]  # without the batch dim


@dataclass(frozen=True)
class Built:
    model: onnx.ModelProto
    inputs: tuple[Tensor, ...]
    outputs: tuple[Tensor, ...]


def _he(rng: np.random.Generator, name: str, shape: Sequence[int], fan_in: int) -> TensorProto:
    arr = rng.standard_normal(tuple(shape), dtype=np.float32) * np.float32(np.sqrt(2.0 / fan_in))
    return numpy_helper.from_array(arr.astype(np.float32), name)


def _bias(rng: np.random.Generator, name: str, size: int) -> TensorProto:
    return numpy_helper.from_array(rng.uniform(-0.05, 0.05, size).astype(np.float32), name)


def _finish(
    nodes: list[onnx.NodeProto],
    name: str,
    inputs: tuple[Tensor, ...],
    outputs: tuple[Tensor, ...],
    initializers: list[TensorProto],
) -> Built:
    graph = helper.make_graph(
        nodes,
        name,
        inputs=[
            helper.make_tensor_value_info(t.name, TensorProto.FLOAT, ["N", *t.dims]) for t in inputs
        ],
        outputs=[
            helper.make_tensor_value_info(t.name, TensorProto.FLOAT, ["N", *t.dims])
            for t in outputs
        ],
        initializer=initializers,
    )
    model = helper.make_model(
        graph,
        ir_version=IR_VERSION,
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name=PRODUCER_NAME,
        producer_version=PRODUCER_VERSION,
    )
    onnx.checker.check_model(model, full_check=True)
    return Built(model, inputs, outputs)


def _mlp(name: str, sizes: Sequence[int], seed: int) -> Built:
    """Gemm layers sizes[0] -> ... -> sizes[-1], Relu between (not after the last)."""
    rng = np.random.default_rng(seed)
    nodes: list[onnx.NodeProto] = []
    inits: list[TensorProto] = []
    cur = "x"
    last = len(sizes) - 2
    for i, (fan_in, fan_out) in enumerate(itertools.pairwise(sizes)):
        w, b = f"fc{i}.weight", f"fc{i}.bias"
        inits += [_he(rng, w, [fan_in, fan_out], fan_in), _bias(rng, b, fan_out)]
        out = "y" if i == last else f"fc{i}"
        nodes.append(helper.make_node("Gemm", [cur, w, b], [out], name=f"fc{i}"))
        if i != last:
            nodes.append(helper.make_node("Relu", [out], [f"relu{i}"], name=f"relu{i}"))
            out = f"relu{i}"
        cur = out
    return _finish(nodes, name, (Tensor("x", (sizes[0],)),), (Tensor("y", (sizes[-1],)),), inits)


def build_tiny_mlp() -> Built:
    return _mlp("tiny_mlp", [64, 256, 256, 10], seed=2001)


def build_wide_mlp(units: int = DEFAULT_WIDE_UNITS) -> Built:
    return _mlp("wide_mlp", [512, units, units, units, units, 16], seed=2002)


def build_cnn() -> Built:
    rng = np.random.default_rng(2003)
    nodes: list[onnx.NodeProto] = []
    inits: list[TensorProto] = []
    cur, channels = "x", 3
    for i, out_ch in enumerate((16, 32, 64), start=1):
        w, b = f"conv{i}.weight", f"conv{i}.bias"
        inits += [_he(rng, w, [out_ch, channels, 3, 3], channels * 9), _bias(rng, b, out_ch)]
        nodes += [
            helper.make_node(
                "Conv",
                [cur, w, b],
                [f"conv{i}"],
                name=f"conv{i}",
                kernel_shape=[3, 3],
                pads=[1, 1, 1, 1],
            ),
            helper.make_node("Relu", [f"conv{i}"], [f"relu{i}"], name=f"relu{i}"),
            helper.make_node(
                "MaxPool",
                [f"relu{i}"],
                [f"pool{i}"],
                name=f"pool{i}",
                kernel_shape=[2, 2],
                strides=[2, 2],
            ),
        ]
        cur, channels = f"pool{i}", out_ch
    inits += [_he(rng, "fc.weight", [channels, 10], channels), _bias(rng, "fc.bias", 10)]
    nodes += [
        helper.make_node("GlobalAveragePool", [cur], ["gap"], name="gap"),
        helper.make_node("Flatten", ["gap"], ["flat"], name="flatten", axis=1),
        helper.make_node("Gemm", ["flat", "fc.weight", "fc.bias"], ["y"], name="fc"),
    ]
    return _finish(nodes, "cnn", (Tensor("x", (3, 64, 64)),), (Tensor("y", (10,)),), inits)


def _tensors(kind: str, tensors: Sequence[Tensor]) -> str:
    items = ",\n".join(
        "  {\n"
        f'    name: "{t.name}"\n'
        "    data_type: TYPE_FP32\n"
        f"    dims: [ {', '.join(str(d) for d in t.dims)} ]\n"
        "  }"
        for t in tensors
    )
    return f"{kind} [\n{items}\n]\n"


def _parameter(key: str, value: str) -> str:
    return f'parameters {{\n  key: "{key}"\n  value {{ string_value: "{value}" }}\n}}\n'


def config_text(
    name: str,
    built: Built,
    *,
    batched: bool,
    delay_us: int,
    intra_op_threads: int,
    slo_target_ms: str | None = None,
    max_batch_size: int = MAX_BATCH_SIZE,
) -> str:
    text = (
        f'name: "{name}"\n'
        'platform: "onnxruntime_onnx"\n'
        f"max_batch_size: {max_batch_size}\n"
        + _tensors("input", built.inputs)
        + _tensors("output", built.outputs)
        + "instance_group [\n  {\n    count: 1\n    kind: KIND_CPU\n  }\n]\n"
    )
    if batched:
        text += f"dynamic_batching {{\n  max_queue_delay_microseconds: {delay_us}\n}}\n"
    text += _parameter("intra_op_thread_count", str(intra_op_threads))
    if slo_target_ms is not None:
        text += _parameter("slo_target_ms", slo_target_ms)
    return text


def _check_config(text: str) -> None:
    """Parse with Triton's own ModelConfig schema when tritonclient is installed."""
    try:
        from google.protobuf import text_format
        from tritonclient.grpc import model_config_pb2
    except ImportError:  # pragma: no cover - tritonclient is a test dependency
        return
    text_format.Parse(text, model_config_pb2.ModelConfig())


def build(
    out: Path,
    *,
    delay_us: int = DEFAULT_DELAY_US,
    intra_op_threads: int = DEFAULT_INTRA_OP,
    slo_target_ms: str = DEFAULT_SLO_MS,
    wide_units: int = DEFAULT_WIDE_UNITS,
    max_batch_size: int = MAX_BATCH_SIZE,
) -> list[str]:
    """Write the repository under ``out``; return the model names written."""
    builders: dict[str, Callable[[], Built]] = {
        "tiny_mlp": build_tiny_mlp,
        "wide_mlp": lambda: build_wide_mlp(wide_units),
        "cnn": build_cnn,
    }
    out.mkdir(parents=True, exist_ok=True)
    written: list[str] = []
    for base in BASE_MODELS:
        built = builders[base]()
        blob = built.model.SerializeToString(deterministic=True)
        variants: list[tuple[str, bool, str | None]] = [
            (base, False, None),
            (f"{base}_batched", True, None),
        ]
        if base in SLO_MODELS:
            variants.append((f"{base}_slo", True, slo_target_ms))
        for name, batched, slo in variants:
            folder = out / name
            if folder.exists():
                shutil.rmtree(folder)
            (folder / "1").mkdir(parents=True)
            (folder / "1" / "model.onnx").write_bytes(blob)
            text = config_text(
                name,
                built,
                batched=batched,
                delay_us=delay_us,
                intra_op_threads=intra_op_threads,
                slo_target_ms=slo,
                max_batch_size=max_batch_size,
            )
            _check_config(text)
            (folder / "config.pbtxt").write_text(text, encoding="utf-8")
            written.append(name)
    return written


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="repository folder")
    parser.add_argument(
        "--max-queue-delay-us",
        type=int,
        default=DEFAULT_DELAY_US,
        help="dynamic_batching max_queue_delay_microseconds of the _batched/_slo models",
    )
    parser.add_argument(
        "--intra-op-threads",
        type=int,
        default=DEFAULT_INTRA_OP,
        help="intra_op_thread_count parameter of every model",
    )
    parser.add_argument(
        "--slo-target-ms", default=DEFAULT_SLO_MS, help="slo_target_ms of wide_mlp_slo"
    )
    parser.add_argument(
        "--wide-units", type=int, default=DEFAULT_WIDE_UNITS, help="width of wide_mlp's layers"
    )
    parser.add_argument("--max-batch-size", type=int, default=MAX_BATCH_SIZE)
    args = parser.parse_args(argv)
    float(args.slo_target_ms)  # fail early on a non-number
    names = build(
        args.out,
        delay_us=args.max_queue_delay_us,
        intra_op_threads=args.intra_op_threads,
        slo_target_ms=args.slo_target_ms,
        wide_units=args.wide_units,
        max_batch_size=args.max_batch_size,
    )
    print(f"wrote {len(names)} models to {args.out}: {', '.join(names)}")


if __name__ == "__main__":
    main()
