"""Builders for deliberately awkward ONNX models used by the tests.

Real exported models are messy: symbolic, unnamed and ``-1`` dims, mismatched
dim names, scalar inputs, non-batch first dims, odd tensor names, contrib-domain
ops, non-tensor outputs, every element type. Each ``build_*`` writes one
``model.onnx`` to ``path`` (creating parent dirs); its docstring says what the
server is expected to make of it. Everything is pinned (IR 8, opset 17,
fixed-seed weights) so the files are byte-identical from run to run.
"""

from __future__ import annotations

import pathlib
from collections.abc import Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

IR_VERSION = 8
OPSET = 17
PRODUCER_NAME = "sluice-tests"

# (suffix used in tensor names, ONNX element type) for build_all_dtypes_identity.
ALL_DTYPES: tuple[tuple[str, int], ...] = (
    ("bool", TensorProto.BOOL),
    ("uint8", TensorProto.UINT8),
    ("uint16", TensorProto.UINT16),
    ("uint32", TensorProto.UINT32),
    ("uint64", TensorProto.UINT64),
    ("int8", TensorProto.INT8),
    ("int16", TensorProto.INT16),
    ("int32", TensorProto.INT32),
    ("int64", TensorProto.INT64),
    ("float16", TensorProto.FLOAT16),
    ("float", TensorProto.FLOAT),
    ("double", TensorProto.DOUBLE),
    ("string", TensorProto.STRING),
)

_Shape = Sequence[str | int | None]


def _vi(name: str, elem_type: int, shape: _Shape) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem_type, shape)


def _const(name: str, value: np.ndarray) -> TensorProto:
    return numpy_helper.from_array(value, name)


def _save(
    path: pathlib.Path,
    graph: onnx.GraphProto,
    extra_opsets: Sequence[tuple[str, int]] = (),
) -> None:
    opsets = [helper.make_opsetid("", OPSET)]
    opsets += [helper.make_opsetid(domain, version) for domain, version in extra_opsets]
    model = helper.make_model(
        graph,
        ir_version=IR_VERSION,
        opset_imports=opsets,
        producer_name=PRODUCER_NAME,
        producer_version="1",
    )
    # Catches builder mistakes early; the checker accepts every quirk used here (even dim -1).
    onnx.checker.check_model(model, full_check=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(model.SerializeToString(deterministic=True))


def build_symbolic_batch(path: pathlib.Path) -> None:
    """``x`` float32 [N, 4] -> ``y`` = x * 2, float32 [N, 4]; "N" is a named symbolic dim.

    Expect: batchable; auto-complete gives max_batch_size > 0, dims [4] in and out.
    """
    graph = helper.make_graph(
        [helper.make_node("Mul", ["x", "two"], ["y"])],
        "symbolic_batch",
        [_vi("x", TensorProto.FLOAT, ["N", 4])],
        [_vi("y", TensorProto.FLOAT, ["N", 4])],
        initializer=[_const("two", np.array(2.0, dtype=np.float32))],
    )
    _save(path, graph)


def build_unnamed_dynamic(path: pathlib.Path) -> None:
    """``x`` float32 [?, 4] -> ``y`` = x * 2; first dim has neither dim_value nor dim_param.

    Expect: treated like a symbolic batch dim (max_batch_size > 0, dims [4]).
    onnxruntime's get_inputs() reports the dim as None.
    """
    graph = helper.make_graph(
        [helper.make_node("Mul", ["x", "two"], ["y"])],
        "unnamed_dynamic",
        [_vi("x", TensorProto.FLOAT, [None, 4])],
        [_vi("y", TensorProto.FLOAT, [None, 4])],
        initializer=[_const("two", np.array(2.0, dtype=np.float32))],
    )
    _save(path, graph)


def build_fixed_minus_one_batch(path: pathlib.Path) -> None:
    """``x`` float32 [-1, 4] -> ``y`` = x * 2; the first dim is stored as dim_value -1.

    Some exporters write -1 for "dynamic". Expect: treated as a dynamic batch dim
    (max_batch_size > 0, dims [4]); it must not be read as a literal size.
    """
    graph = helper.make_graph(
        [helper.make_node("Mul", ["x", "two"], ["y"])],
        "fixed_minus_one_batch",
        [_vi("x", TensorProto.FLOAT, [-1, 4])],
        [_vi("y", TensorProto.FLOAT, [-1, 4])],
        initializer=[_const("two", np.array(2.0, dtype=np.float32))],
    )
    _save(path, graph)


def build_mismatched_dim_names(path: pathlib.Path) -> None:
    """``x`` float32 [batch, seq] -> ``y`` = relu(x), float32 [N, M].

    Input and output name the same dims differently ("batch" vs "N", "seq" vs "M").
    Expect: still batchable (max_batch_size > 0); input dims [-1], output dims [-1];
    the server must not require dim names to match across inputs and outputs.
    """
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "mismatched_dim_names",
        [_vi("x", TensorProto.FLOAT, ["batch", "seq"])],
        [_vi("y", TensorProto.FLOAT, ["N", "M"])],
    )
    _save(path, graph)


def build_multi_dtype_inputs(path: pathlib.Path) -> None:
    """``int_in`` int64, ``bool_in`` bool, ``float_in`` float32 [B, 3] -> ``out`` float32 [B, 3].

    out = float_in + float(int_in) * float(bool_in).
    Expect: batchable (max_batch_size > 0), each input dims [3], three distinct dtypes.
    """
    graph = helper.make_graph(
        [
            helper.make_node("Cast", ["int_in"], ["int_f"], to=TensorProto.FLOAT),
            helper.make_node("Cast", ["bool_in"], ["bool_f"], to=TensorProto.FLOAT),
            helper.make_node("Mul", ["int_f", "bool_f"], ["masked"]),
            helper.make_node("Add", ["float_in", "masked"], ["out"]),
        ],
        "multi_dtype_inputs",
        [
            _vi("int_in", TensorProto.INT64, ["B", 3]),
            _vi("bool_in", TensorProto.BOOL, ["B", 3]),
            _vi("float_in", TensorProto.FLOAT, ["B", 3]),
        ],
        [_vi("out", TensorProto.FLOAT, ["B", 3])],
    )
    _save(path, graph)


def build_scalar_input(path: pathlib.Path) -> None:
    """``x`` float32 [B, 4] and rank-0 ``scale`` float32 [] -> ``y`` = x * scale, float32 [B, 4].

    Expect: max_batch_size 0 -- the scalar has no batch dim, so requests cannot be
    concatenated; dims are reported in full (x [-1, 4], scale [], y [-1, 4]).
    """
    graph = helper.make_graph(
        [helper.make_node("Mul", ["x", "scale"], ["y"])],
        "scalar_input",
        [_vi("x", TensorProto.FLOAT, ["B", 4]), _vi("scale", TensorProto.FLOAT, [])],
        [_vi("y", TensorProto.FLOAT, ["B", 4])],
    )
    _save(path, graph)


def build_non_batch_first_dim(path: pathlib.Path) -> None:
    """``x`` float32 [3, 4] -> ``y`` = x * 2, float32 [3, 4]; all dims fixed.

    Expect: max_batch_size 0 (first dim 3 is not a batch dim), dims [3, 4] in and out.
    """
    graph = helper.make_graph(
        [helper.make_node("Mul", ["x", "two"], ["y"])],
        "non_batch_first_dim",
        [_vi("x", TensorProto.FLOAT, [3, 4])],
        [_vi("y", TensorProto.FLOAT, [3, 4])],
        initializer=[_const("two", np.array(2.0, dtype=np.float32))],
    )
    _save(path, graph)


def build_odd_output_names(path: pathlib.Path) -> None:
    """``x`` float32 [B, 4] -> three float32 [B, 4] outputs with exporter-style names.

    - ``model/output/Add`` = x + 1  (slashes, as in TF/PyTorch node paths)
    - ``logits/add:0``     = x - 1  (TF-style ``:0`` suffix)
    - ``123``              = x * 3  (digits only)
    Expect: names survive verbatim in metadata, requests and responses
    (URL paths, JSON keys, metric labels); batchable (max_batch_size > 0).
    """
    graph = helper.make_graph(
        [
            helper.make_node("Add", ["x", "one"], ["model/output/Add"]),
            helper.make_node("Sub", ["x", "one"], ["logits/add:0"]),
            helper.make_node("Mul", ["x", "three"], ["123"]),
        ],
        "odd_output_names",
        [_vi("x", TensorProto.FLOAT, ["B", 4])],
        [
            _vi("model/output/Add", TensorProto.FLOAT, ["B", 4]),
            _vi("logits/add:0", TensorProto.FLOAT, ["B", 4]),
            _vi("123", TensorProto.FLOAT, ["B", 4]),
        ],
        initializer=[
            _const("one", np.array(1.0, dtype=np.float32)),
            _const("three", np.array(3.0, dtype=np.float32)),
        ],
    )
    _save(path, graph)


def build_com_microsoft_op(path: pathlib.Path) -> None:
    """``x`` float32 [B, 8] -> ``y`` = com.microsoft Gelu(x), float32 [B, 8].

    Imports domain "com.microsoft" version 1 besides ai.onnx 17. Expect: loads and
    runs on onnxruntime CPU; batchable (max_batch_size > 0, dims [8]).
    Reference: y = 0.5 * x * (1 + erf(x / sqrt(2))).
    """
    graph = helper.make_graph(
        [helper.make_node("Gelu", ["x"], ["y"], domain="com.microsoft")],
        "com_microsoft_op",
        [_vi("x", TensorProto.FLOAT, ["B", 8])],
        [_vi("y", TensorProto.FLOAT, ["B", 8])],
    )
    _save(path, graph, [("com.microsoft", 1)])


def build_zipmap_classifier(path: pathlib.Path) -> None:
    """skl2onnx-style classifier: ``input`` float32 [N, 4] -> ``label``, ``probabilities``.

    ``label`` is int64 [N] (ArgMax, keepdims=0): rank 1, batch dim only, so with
    max_batch_size > 0 it has no non-batch dims. ``probabilities`` is
    seq(map(int64, float)) from ai.onnx.ml ZipMap (classlabels 0, 1, 2) -- a
    non-tensor output; onnxruntime reports type "seq(map(int64,tensor(float)))",
    shape [], and run() returns a list of dicts. Imports ai.onnx.ml version 3.
    Expect: the server reports the non-tensor output clearly (reject the model or
    the output with a useful message, or serve only ``label``); it must not crash.
    """
    rng = np.random.default_rng(3)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["input", "coef"], ["scores_raw"]),
            helper.make_node("Add", ["scores_raw", "intercept"], ["scores"]),
            helper.make_node("Softmax", ["scores"], ["probability_tensor"], axis=1),
            helper.make_node("ArgMax", ["probability_tensor"], ["label"], axis=1, keepdims=0),
            helper.make_node(
                "ZipMap",
                ["probability_tensor"],
                ["probabilities"],
                domain="ai.onnx.ml",
                classlabels_int64s=[0, 1, 2],
            ),
        ],
        "zipmap_classifier",
        [_vi("input", TensorProto.FLOAT, ["N", 4])],
        [
            _vi("label", TensorProto.INT64, ["N"]),
            helper.make_value_info(
                "probabilities",
                helper.make_sequence_type_proto(
                    helper.make_map_type_proto(
                        TensorProto.INT64, helper.make_tensor_type_proto(TensorProto.FLOAT, [])
                    )
                ),
            ),
        ],
        initializer=[
            _const("coef", rng.standard_normal((4, 3), dtype=np.float32)),
            _const("intercept", rng.standard_normal(3, dtype=np.float32)),
        ],
    )
    _save(path, graph, [("ai.onnx.ml", 3)])


def build_all_dtypes_identity(path: pathlib.Path) -> None:
    """One Identity ``in_<t>`` -> ``out_<t>`` pair, shape [B, 2], per type in ALL_DTYPES.

    Types: bool, uint8, uint16, uint32, uint64, int8, int16, int32, int64,
    float16, float, double, string. Expect: batchable (max_batch_size > 0), dims [2];
    each Triton datatype round-trips (TYPE_BOOL ... TYPE_FP64, TYPE_STRING / BYTES).
    """
    graph = helper.make_graph(
        [helper.make_node("Identity", [f"in_{t}"], [f"out_{t}"]) for t, _ in ALL_DTYPES],
        "all_dtypes_identity",
        [_vi(f"in_{t}", elem, ["B", 2]) for t, elem in ALL_DTYPES],
        [_vi(f"out_{t}", elem, ["B", 2]) for t, elem in ALL_DTYPES],
    )
    _save(path, graph)


def build_bf16_identity(path: pathlib.Path) -> None:
    """``in_bfloat16`` bfloat16 [B, 2] -> Identity -> ``out_bfloat16`` bfloat16 [B, 2].

    onnxruntime 1.32 CPU loads and runs it (Identity has a bfloat16 kernel), but numpy
    has no bfloat16: session.run rejects ml_dtypes.bfloat16 arrays, and OrtValue.numpy()
    on the output raises. What works: feed
    OrtValue.ortvalue_from_numpy_with_onnx_type(arr.view(np.uint16), TensorProto.BFLOAT16)
    and read the output through IOBinding into a preallocated uint16 OrtValue made the
    same way (or via data_ptr()). Expect: TYPE_BF16 in metadata; batchable (dims [2]).
    """
    graph = helper.make_graph(
        [helper.make_node("Identity", ["in_bfloat16"], ["out_bfloat16"])],
        "bf16_identity",
        [_vi("in_bfloat16", TensorProto.BFLOAT16, ["B", 2])],
        [_vi("out_bfloat16", TensorProto.BFLOAT16, ["B", 2])],
    )
    _save(path, graph)


def build_raises_sometimes(path: pathlib.Path) -> None:
    """``x`` float32 [B, 4] and ``shape`` int64 [2] -> ``y`` = Reshape(x, shape), float32 [?, ?].

    Loads fine; fails at run time when ``shape`` does not match x's element count
    (e.g. x [2, 4] with shape [3, 3]) -- onnxruntime raises an error the server must
    turn into a per-request error, not a crash. Valid: shape [4, 2] or [-1, 2].
    Expect: max_batch_size 0 (``shape`` has a fixed first dim of 2, no batch dim).
    """
    graph = helper.make_graph(
        [helper.make_node("Reshape", ["x", "shape"], ["y"])],
        "raises_sometimes",
        [_vi("x", TensorProto.FLOAT, ["B", 4]), _vi("shape", TensorProto.INT64, [2])],
        [_vi("y", TensorProto.FLOAT, [None, None])],
    )
    _save(path, graph)


def build_add_sub(path: pathlib.Path) -> None:
    """Triton's "simple" model: ``INPUT0``, ``INPUT1`` int32 [B, 16].

    ``OUTPUT0`` = INPUT0 + INPUT1, ``OUTPUT1`` = INPUT0 - INPUT1, both int32 [B, 16].
    Expect: batchable (max_batch_size > 0), dims [16] for all four tensors;
    matches the client examples written against Triton's "simple" model.
    """
    graph = helper.make_graph(
        [
            helper.make_node("Add", ["INPUT0", "INPUT1"], ["OUTPUT0"]),
            helper.make_node("Sub", ["INPUT0", "INPUT1"], ["OUTPUT1"]),
        ],
        "add_sub",
        [_vi("INPUT0", TensorProto.INT32, ["B", 16]), _vi("INPUT1", TensorProto.INT32, ["B", 16])],
        [
            _vi("OUTPUT0", TensorProto.INT32, ["B", 16]),
            _vi("OUTPUT1", TensorProto.INT32, ["B", 16]),
        ],
    )
    _save(path, graph)


def build_scaler(path: pathlib.Path, factor: float = 1.0, width: int = 4) -> None:
    """``x`` float32 [N, width] -> ``y`` = x * factor, float32 [N, width]."""
    graph = helper.make_graph(
        [helper.make_node("Mul", ["x", "k"], ["y"])],
        "scaler",
        [_vi("x", TensorProto.FLOAT, ["N", width])],
        [_vi("y", TensorProto.FLOAT, ["N", width])],
        [_const("k", np.array(factor, dtype=np.float32))],
    )
    _save(path, graph)
