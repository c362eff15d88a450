"""Build the bundled example model repository deterministically.

Usage: ``python -m sluice.examples.build_examples [--out DIR]``; writes
``DIR/models/<model>/...`` (default DIR: the folder of this file).

Running it twice yields byte-identical files: weights come from a fixed-seed
generator, and the IR version, opset imports and producer fields are pinned so
the output does not depend on the installed onnx's defaults.
"""

from __future__ import annotations

import argparse
import pathlib
from collections.abc import Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

# Pinned so the bytes do not drift with the installed onnx; onnxruntime 1.32 runs both.
IR_VERSION = 8
OPSET = 17
PRODUCER_NAME = "sluice-examples"
PRODUCER_VERSION = "1"

TABULAR_CONFIG = """\
name: "tabular_classifier"
platform: "onnxruntime_onnx"
max_batch_size: 64
input [
  {
    name: "features"
    data_type: TYPE_FP32
    dims: [ 8 ]
  }
]
output [
  {
    name: "probabilities"
    data_type: TYPE_FP32
    dims: [ 3 ]
  },
  {
    name: "label"
    data_type: TYPE_INT64
    dims: [ 1 ]
  }
]
instance_group [
  {
    count: 1
    kind: KIND_CPU
  }
]
dynamic_batching {
  max_queue_delay_microseconds: 500
}
"""


def _weights(rng: np.random.Generator, name: str, shape: Sequence[int], fan_in: int) -> TensorProto:
    # He-style scaling keeps activations in a sane range so the outputs look like real predictions.
    arr = rng.standard_normal(tuple(shape), dtype=np.float32) * np.float32(np.sqrt(2.0 / fan_in))
    return numpy_helper.from_array(arr.astype(np.float32), name)


def _bias(rng: np.random.Generator, name: str, size: int) -> TensorProto:
    arr = rng.uniform(-0.1, 0.1, size).astype(np.float32)
    return numpy_helper.from_array(arr, name)


def _model(graph: onnx.GraphProto) -> onnx.ModelProto:
    model = helper.make_model(
        graph,
        ir_version=IR_VERSION,
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name=PRODUCER_NAME,
        producer_version=PRODUCER_VERSION,
    )
    # full_check runs strict shape inference, catching graph/declared-shape mismatches.
    onnx.checker.check_model(model, full_check=True)
    return model


def build_tabular_classifier() -> onnx.ModelProto:
    rng = np.random.default_rng(1001)
    nodes = [
        helper.make_node("Gemm", ["features", "fc1.weight", "fc1.bias"], ["fc1"], name="fc1"),
        helper.make_node("Relu", ["fc1"], ["relu1"], name="relu1"),
        helper.make_node("Gemm", ["relu1", "fc2.weight", "fc2.bias"], ["logits"], name="fc2"),
        helper.make_node("Softmax", ["logits"], ["probabilities"], name="softmax", axis=-1),
        # keepdims=1 gives label shape [batch, 1]: Triton needs >= 1 non-batch dim per tensor.
        helper.make_node("ArgMax", ["logits"], ["label"], name="argmax", axis=1, keepdims=1),
    ]
    graph = helper.make_graph(
        nodes,
        "tabular_classifier",
        inputs=[helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", 8])],
        outputs=[
            helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", 3]),
            helper.make_tensor_value_info("label", TensorProto.INT64, ["batch", 1]),
        ],
        initializer=[
            _weights(rng, "fc1.weight", [8, 32], 8),
            _bias(rng, "fc1.bias", 32),
            _weights(rng, "fc2.weight", [32, 3], 32),
            _bias(rng, "fc2.bias", 3),
        ],
    )
    return _model(graph)


def build_image_classifier() -> onnx.ModelProto:
    rng = np.random.default_rng(1002)
    nodes = [
        helper.make_node(
            "Conv",
            ["image", "conv1.weight", "conv1.bias"],
            ["conv1"],
            name="conv1",
            kernel_shape=[3, 3],
            pads=[1, 1, 1, 1],
        ),
        helper.make_node("Relu", ["conv1"], ["relu1"], name="relu1"),
        helper.make_node(
            "MaxPool", ["relu1"], ["pool1"], name="pool1", kernel_shape=[2, 2], strides=[2, 2]
        ),
        helper.make_node(
            "Conv",
            ["pool1", "conv2.weight", "conv2.bias"],
            ["conv2"],
            name="conv2",
            kernel_shape=[3, 3],
            pads=[1, 1, 1, 1],
        ),
        helper.make_node("Relu", ["conv2"], ["relu2"], name="relu2"),
        helper.make_node("GlobalAveragePool", ["relu2"], ["gap"], name="gap"),
        helper.make_node("Flatten", ["gap"], ["flat"], name="flatten", axis=1),
        helper.make_node("Gemm", ["flat", "fc.weight", "fc.bias"], ["logits"], name="fc"),
        helper.make_node("Softmax", ["logits"], ["probabilities"], name="softmax", axis=-1),
    ]
    graph = helper.make_graph(
        nodes,
        "image_classifier",
        inputs=[helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 3, 32, 32])],
        outputs=[helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", 10])],
        initializer=[
            _weights(rng, "conv1.weight", [8, 3, 3, 3], 3 * 9),
            _bias(rng, "conv1.bias", 8),
            _weights(rng, "conv2.weight", [16, 8, 3, 3], 8 * 9),
            _bias(rng, "conv2.bias", 16),
            _weights(rng, "fc.weight", [16, 10], 16),
            _bias(rng, "fc.bias", 10),
        ],
    )
    return _model(graph)


def build_text_echo() -> onnx.ModelProto:
    graph = helper.make_graph(
        [helper.make_node("Identity", ["text"], ["text_out"], name="echo")],
        "text_echo",
        inputs=[helper.make_tensor_value_info("text", TensorProto.STRING, ["batch", 1])],
        outputs=[helper.make_tensor_value_info("text_out", TensorProto.STRING, ["batch", 1])],
    )
    return _model(graph)


def _write_model(model: onnx.ModelProto, path: pathlib.Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # deterministic=True pins field ordering so reruns are byte-identical.
    path.write_bytes(model.SerializeToString(deterministic=True))


def build(out: pathlib.Path) -> list[pathlib.Path]:
    """Write the example repository under ``out / "models"``; return the files written."""
    models = out / "models"
    written: list[pathlib.Path] = []
    for name, model in (
        ("tabular_classifier", build_tabular_classifier()),
        ("image_classifier", build_image_classifier()),
        ("text_echo", build_text_echo()),
    ):
        path = models / name / "1" / "model.onnx"
        _write_model(model, path)
        written.append(path)
    # Only the tabular model gets a config; the others demonstrate auto-completion from the graph.
    config = models / "tabular_classifier" / "config.pbtxt"
    config.write_bytes(TABULAR_CONFIG.encode("utf-8"))
    written.append(config)
    return written


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--out",
        type=pathlib.Path,
        default=pathlib.Path(__file__).resolve().parent,
        help="directory that receives models/ (default: %(default)s)",
    )
    args = parser.parse_args(argv)
    for path in build(args.out):
        print(path)


if __name__ == "__main__":
    main()
