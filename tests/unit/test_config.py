"""Config parsing, auto-completion and checking against real ONNX graphs.

Every model here is a real graph from tests/onnx_models.py (or a tiny one built
below) loaded by real onnxruntime through sluice.runtime.load_runtime, the same
path the server takes. No tritonclient in this module: sluice's generated
protobuf modules would clash with its descriptors; sluice_proto_pool keeps
sluice's out of the default pool so both modules can share one pytest process.
"""

from __future__ import annotations

import logging
import math
import pathlib
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import onnx
import onnx_models as om
import onnxruntime as ort
import pytest
import sluice_proto_pool  # noqa: F401  (before any sluice import: see its docstring)
from google.protobuf import text_format
from onnx import TensorProto, helper
from sluice import config as cfg
from sluice import datatypes
from sluice.errors import ModelLoadError
from sluice.host import ExecutorLoader, ModelManager
from sluice.proto import model_config_pb2 as mc
from sluice.repository.policy import select_versions, version_dirs
from sluice.runtime import ModelRuntime, RuntimeOptions, load_runtime
from sluice.runtime.warmup import warm_up

Builder = Callable[[pathlib.Path], None]
TensorRow = tuple[str, str, list[int]]  # (name, TYPE_*, dims)

# onnxruntime (CPU build) warns before dropping a provider it does not have; the
# server's own check after session creation is what these tests are about.
ORT_MISSING_PROVIDER = "ignore:Specified provider:UserWarning"
HAS_CUDA = "CUDAExecutionProvider" in ort.get_available_providers()

# Triton's "simple" model config, as a Triton user writes it.
TRITON_PBTXT = """
name: "simple"
platform: "onnxruntime_onnx"
max_batch_size: 8
version_policy: { latest: { num_versions: 2 } }
input [
  {
    name: "INPUT0"
    data_type: TYPE_INT32
    dims: [ 16 ]
  },
  {
    name: "INPUT1"
    data_type: TYPE_INT32
    dims: [ 16 ]
  }
]
output [
  {
    name: "OUTPUT0"
    data_type: TYPE_INT32
    dims: [ 16 ]
  },
  {
    name: "OUTPUT1"
    data_type: TYPE_INT32
    dims: [ 16 ]
  }
]
instance_group [
  {
    count: 2
    kind: KIND_CPU
  }
]
dynamic_batching {
  preferred_batch_size: [ 4, 8 ]
  max_queue_delay_microseconds: 100
  priority_levels: 2
  default_priority_level: 1
  default_queue_policy { timeout_action: REJECT max_queue_size: 16 }
  priority_queue_policy {
    key: 1
    value: {
      timeout_action: DELAY
      default_timeout_microseconds: 50000
      allow_timeout_override: true
      max_queue_size: 8
    }
  }
}
parameters { key: "intra_op_thread_count" value: { string_value: "1" } }
parameters { key: "execution_mode" value: { string_value: "0" } }
model_warmup [
  {
    name: "zeros"
    batch_size: 2
    count: 1
    inputs { key: "INPUT0" value: { data_type: TYPE_INT32 dims: [ 16 ] zero_data: true } }
    inputs { key: "INPUT1" value: { data_type: TYPE_INT32 dims: [ 16 ] random_data: true } }
  }
]
"""

TRITON_OPTIMIZATION_PBTXT = """
optimization {
  graph: { level: 1 }
  execution_accelerators {
    gpu_execution_accelerator : [ {
      name : "tensorrt"
      parameters { key: "precision_mode" value: "FP16" }
      parameters { key: "max_workspace_size_bytes" value: "1073741824" }
    } ]
    cpu_execution_accelerator : [ {
      name : "openvino"
      parameters { key: "device_type" value: "CPU" }
    } ]
  }
}
"""

# The same config, field for field, as config.yaml.
TRITON_YAML = """
name: simple
platform: onnxruntime_onnx
max_batch_size: 8
version_policy: {latest: {num_versions: 2}}
input:
  - {name: INPUT0, data_type: TYPE_INT32, dims: [16]}
  - {name: INPUT1, data_type: TYPE_INT32, dims: [16]}
output:
  - {name: OUTPUT0, data_type: TYPE_INT32, dims: [16]}
  - {name: OUTPUT1, data_type: TYPE_INT32, dims: [16]}
instance_group:
  - {count: 2, kind: KIND_CPU}
dynamic_batching:
  preferred_batch_size: [4, 8]
  max_queue_delay_microseconds: 100
  priority_levels: 2
  default_priority_level: 1
  default_queue_policy: {timeout_action: REJECT, max_queue_size: 16}
  priority_queue_policy:
    1:
      timeout_action: DELAY
      default_timeout_microseconds: 50000
      allow_timeout_override: true
      max_queue_size: 8
parameters:
  intra_op_thread_count: {string_value: "1"}
  execution_mode: {string_value: "0"}
model_warmup:
  - name: zeros
    batch_size: 2
    count: 1
    inputs:
      INPUT0: {data_type: TYPE_INT32, dims: [16], zero_data: true}
      INPUT1: {data_type: TYPE_INT32, dims: [16], random_data: true}
optimization:
  graph: {level: 1}
  execution_accelerators:
    gpu_execution_accelerator:
      - name: tensorrt
        parameters: {precision_mode: FP16, max_workspace_size_bytes: "1073741824"}
    cpu_execution_accelerator:
      - name: openvino
        parameters: {device_type: CPU}
"""


# ---- helpers -------------------------------------------------------------------------


def _model_dir(
    root: pathlib.Path,
    name: str,
    builder: Builder,
    config_text: str | None = None,
    config_file: str = "config.pbtxt",
    versions: tuple[int, ...] = (1,),
) -> pathlib.Path:
    model_dir = root / name
    for v in versions:
        builder(model_dir / str(v) / "model.onnx")
    if config_text is not None:
        (model_dir / config_file).write_text(config_text, encoding="utf-8")
    return model_dir


def _load(
    model_dir: pathlib.Path,
    options: RuntimeOptions | None = None,
    version: int = 1,
) -> tuple[mc.ModelConfig, ModelRuntime, list[str]]:
    """What the server does for one version: read, check, load, complete, warm up."""
    config, _ = cfg.read_config_file(model_dir)
    cfg.validate_static(config, model_dir.name)
    path = cfg.model_file(model_dir, version, config)
    runtime, notes = load_runtime(path, config, model_dir.name, options or RuntimeOptions())
    warm_up(runtime, config, model_dir)
    return config, runtime, notes


def _rows(tensors: Iterable[Any]) -> list[TensorRow]:
    return [(t.name, mc.DataType.Name(t.data_type), list(t.dims)) for t in tensors]


def _sessions(runtime: ModelRuntime) -> list[ort.InferenceSession]:
    """The runtime's sessions (one per instance); they go back in its free queue."""
    sessions = [runtime._free.get_nowait() for _ in range(runtime.instance_count)]
    for s in sessions:
        runtime._free.put(s)
    return sessions


def _zero_feeds(config: mc.ModelConfig, skip: str) -> dict[str, np.ndarray[Any, Any]]:
    feeds: dict[str, np.ndarray[Any, Any]] = {}
    for t in config.input:
        if t.name == skip:
            continue
        dt = datatypes.by_config_enum(t.data_type)
        assert dt.numpy is not None
        feeds[t.name] = np.zeros((1, *t.dims), dtype=dt.numpy)
    return feeds


def _build_reshape_allowzero(path: pathlib.Path) -> None:
    """``x`` float32 [B, 4], ``shape`` int64 [2] -> Reshape(x, shape, allowzero=1).

    The generated warm-up feeds zeros: shape [0, 0] with allowzero=1 asks for an
    empty tensor, which x [1, 4] cannot become, so that run really fails (with
    allowzero=0, as in onnx_models.build_raises_sometimes, 0 copies x's dim and works).
    """
    graph = helper.make_graph(
        [helper.make_node("Reshape", ["x", "shape"], ["y"], allowzero=1)],
        "reshape_allowzero",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", 4]),
            helper.make_tensor_value_info("shape", TensorProto.INT64, [2]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, None])],
    )
    model = helper.make_model(
        graph, ir_version=om.IR_VERSION, opset_imports=[helper.make_opsetid("", om.OPSET)]
    )
    onnx.checker.check_model(model, full_check=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(model.SerializeToString(deterministic=True))


# ---- parsing -------------------------------------------------------------------------


def test_triton_pbtxt_parses_every_field(tmp_path: pathlib.Path) -> None:
    model_dir = _model_dir(
        tmp_path, "simple", om.build_add_sub, TRITON_PBTXT + TRITON_OPTIMIZATION_PBTXT
    )
    config, path = cfg.read_config_file(model_dir)
    assert path == model_dir / "config.pbtxt"
    cfg.validate_static(config, "simple")

    assert config.name == "simple"
    assert config.platform == "onnxruntime_onnx"
    assert config.max_batch_size == 8
    assert config.version_policy.latest.num_versions == 2
    assert _rows(config.input) == [("INPUT0", "TYPE_INT32", [16]), ("INPUT1", "TYPE_INT32", [16])]
    assert _rows(config.output) == [
        ("OUTPUT0", "TYPE_INT32", [16]),
        ("OUTPUT1", "TYPE_INT32", [16]),
    ]
    assert [(g.count, g.kind) for g in config.instance_group] == [
        (2, mc.ModelInstanceGroup.KIND_CPU)
    ]

    db = config.dynamic_batching
    assert config.WhichOneof("scheduling_choice") == "dynamic_batching"
    assert list(db.preferred_batch_size) == [4, 8]
    assert db.max_queue_delay_microseconds == 100
    assert (db.priority_levels, db.default_priority_level) == (2, 1)
    assert db.default_queue_policy.max_queue_size == 16
    assert list(db.priority_queue_policy) == [1]
    policy = db.priority_queue_policy[1]
    assert policy.timeout_action == mc.ModelQueuePolicy.DELAY
    assert policy.default_timeout_microseconds == 50000
    assert policy.allow_timeout_override
    assert policy.max_queue_size == 8

    acc = config.optimization.execution_accelerators
    assert config.optimization.graph.level == 1
    assert [a.name for a in acc.gpu_execution_accelerator] == ["tensorrt"]
    assert dict(acc.gpu_execution_accelerator[0].parameters) == {
        "precision_mode": "FP16",
        "max_workspace_size_bytes": "1073741824",
    }
    assert [a.name for a in acc.cpu_execution_accelerator] == ["openvino"]
    assert dict(acc.cpu_execution_accelerator[0].parameters) == {"device_type": "CPU"}

    assert {k: v.string_value for k, v in config.parameters.items()} == {
        "intra_op_thread_count": "1",
        "execution_mode": "0",
    }

    (warmup,) = config.model_warmup
    assert (warmup.name, warmup.batch_size, warmup.count) == ("zeros", 2, 1)
    assert warmup.inputs["INPUT0"].WhichOneof("input_data_type") == "zero_data"
    assert warmup.inputs["INPUT1"].WhichOneof("input_data_type") == "random_data"
    assert list(warmup.inputs["INPUT1"].dims) == [16]


@pytest.mark.parametrize("yaml_name", ["config.yaml", "config.yml"])
def test_yaml_config_equals_the_same_pbtxt(tmp_path: pathlib.Path, yaml_name: str) -> None:
    pbtxt_dir = _model_dir(
        tmp_path / "a", "simple", om.build_add_sub, TRITON_PBTXT + TRITON_OPTIMIZATION_PBTXT
    )
    yaml_dir = _model_dir(tmp_path / "b", "simple", om.build_add_sub, TRITON_YAML, yaml_name)
    from_pbtxt, _ = cfg.read_config_file(pbtxt_dir)
    from_yaml, path = cfg.read_config_file(yaml_dir)
    assert path == yaml_dir / yaml_name
    assert from_yaml == from_pbtxt
    # Not trivially equal: both really hold the config.
    assert from_yaml.dynamic_batching.priority_queue_policy[1].max_queue_size == 8


def test_triton_pbtxt_loads_as_declared(tmp_path: pathlib.Path) -> None:
    model_dir = _model_dir(tmp_path, "simple", om.build_add_sub, TRITON_PBTXT)
    config, runtime, _ = _load(model_dir, RuntimeOptions(cores=4))
    assert config.max_batch_size == 8  # the config's, not the auto-complete default
    assert runtime.instance_count == 2
    assert [s.get_session_options().intra_op_num_threads for s in _sessions(runtime)] == [1, 1]
    a = np.arange(32, dtype=np.int32).reshape(2, 16)
    b = np.ones((2, 16), dtype=np.int32)
    out0, out1 = runtime.run({"INPUT0": a, "INPUT1": b}, ["OUTPUT0", "OUTPUT1"])
    np.testing.assert_array_equal(out0, a + b)
    np.testing.assert_array_equal(out1, a - b)


def test_no_config_file_gives_an_empty_config(tmp_path: pathlib.Path) -> None:
    model_dir = _model_dir(tmp_path, "bare", om.build_symbolic_batch)
    config, path = cfg.read_config_file(model_dir)
    assert path is None
    assert config == mc.ModelConfig()


@pytest.mark.parametrize(
    ("config_file", "text"),
    [
        ("config.pbtxt", 'max_batch_size: "eight"\n'),
        ("config.pbtxt", 'input [ { name: "x" data_type: TYPE_FP32 \n'),
        ("config.pbtxt", "no_such_field: 1\n"),
        ("config.pbtxt", "input [ { data_type: TYPE_NOPE } ]\n"),
        ("config.yaml", "input: [\n  {name: x\n"),
        ("config.yaml", "- name: m\n- max_batch_size: 4\n"),
        ("config.yaml", "no_such_field: 1\n"),
        ("config.yaml", "max_batch_size: [1]\n"),
        ("config.yml", "instance_group: [{kind: KIND_NOPE}]\n"),
    ],
)
def test_malformed_config_names_the_file(
    tmp_path: pathlib.Path, config_file: str, text: str
) -> None:
    model_dir = _model_dir(tmp_path, "broken", om.build_symbolic_batch, text, config_file)
    with pytest.raises(ModelLoadError) as info:
        cfg.read_config_file(model_dir)
    assert config_file in info.value.message
    assert "broken" in info.value.message


def test_two_config_files_are_rejected(tmp_path: pathlib.Path) -> None:
    model_dir = _model_dir(tmp_path, "twice", om.build_symbolic_batch, "max_batch_size: 4\n")
    (model_dir / "config.yaml").write_text("max_batch_size: 4\n", encoding="utf-8")
    with pytest.raises(ModelLoadError) as info:
        cfg.read_config_file(model_dir)
    assert "config.pbtxt" in info.value.message
    assert "config.yaml" in info.value.message


@pytest.mark.parametrize(
    "text",
    [
        'platform: "tensorflow_savedmodel"',
        'platform: "tensorrt_plan"',
        'platform: "ensemble"',
        'backend: "python"',
        'backend: "pytorch"',
    ],
)
def test_unsupported_platform_or_backend_is_rejected(tmp_path: pathlib.Path, text: str) -> None:
    model_dir = _model_dir(tmp_path, "m", om.build_symbolic_batch, text)
    config, _ = cfg.read_config_file(model_dir)
    with pytest.raises(ModelLoadError) as info:
        cfg.validate_static(config, "m")
    value = text.split('"')[1]
    assert f"'{value}'" in info.value.message


@pytest.mark.parametrize(
    "text",
    ['platform: "onnxruntime_onnx"', 'backend: "onnxruntime"', ""],
)
def test_onnx_platform_and_backend_are_accepted(tmp_path: pathlib.Path, text: str) -> None:
    model_dir = _model_dir(tmp_path, "m", om.build_symbolic_batch, text)
    config, runtime, _ = _load(model_dir)
    assert runtime.instance_count == 1
    assert config.platform == "onnxruntime_onnx" or config.backend == "onnxruntime"


@pytest.mark.parametrize(
    ("text", "scheduler"),
    [
        ("sequence_batching { max_sequence_idle_microseconds: 5000000 }", "sequence_batching"),
        (
            'ensemble_scheduling { step [ { model_name: "a" model_version: -1 } ] }',
            "ensemble_scheduling",
        ),
    ],
)
def test_sequence_batching_and_ensembles_are_rejected(
    tmp_path: pathlib.Path, text: str, scheduler: str
) -> None:
    model_dir = _model_dir(tmp_path, "m", om.build_symbolic_batch, text)
    config, _ = cfg.read_config_file(model_dir)
    with pytest.raises(ModelLoadError) as info:
        cfg.validate_static(config, "m")
    assert scheduler in info.value.message


def test_config_name_must_match_the_folder(tmp_path: pathlib.Path) -> None:
    model_dir = _model_dir(tmp_path, "folder_name", om.build_symbolic_batch, 'name: "other"')
    config, _ = cfg.read_config_file(model_dir)
    with pytest.raises(ModelLoadError) as info:
        cfg.validate_static(config, "folder_name")
    assert "'other'" in info.value.message
    assert "'folder_name'" in info.value.message


# ---- auto-completion of messy graphs -------------------------------------------------

F32 = "TYPE_FP32"

COMPLETIONS: list[tuple[Builder, int, list[TensorRow], list[TensorRow]]] = [
    (om.build_symbolic_batch, 4, [("x", F32, [4])], [("y", F32, [4])]),
    (om.build_unnamed_dynamic, 4, [("x", F32, [4])], [("y", F32, [4])]),
    (om.build_fixed_minus_one_batch, 4, [("x", F32, [4])], [("y", F32, [4])]),
    (om.build_mismatched_dim_names, 4, [("x", F32, [-1])], [("y", F32, [-1])]),
    (
        om.build_multi_dtype_inputs,
        4,
        [("int_in", "TYPE_INT64", [3]), ("bool_in", "TYPE_BOOL", [3]), ("float_in", F32, [3])],
        [("out", F32, [3])],
    ),
    (
        om.build_scalar_input,
        0,
        [("x", F32, [-1, 4]), ("scale", F32, [])],
        [("y", F32, [-1, 4])],
    ),
    (om.build_non_batch_first_dim, 0, [("x", F32, [3, 4])], [("y", F32, [3, 4])]),
    (
        om.build_odd_output_names,
        4,
        [("x", F32, [4])],
        [("model/output/Add", F32, [4]), ("logits/add:0", F32, [4]), ("123", F32, [4])],
    ),
    (om.build_com_microsoft_op, 4, [("x", F32, [8])], [("y", F32, [8])]),
    (om.build_zipmap_classifier, 4, [("input", F32, [4])], [("label", "TYPE_INT64", [])]),
    (
        om.build_bf16_identity,
        4,
        [("in_bfloat16", "TYPE_BF16", [2])],
        [("out_bfloat16", "TYPE_BF16", [2])],
    ),
    (
        om.build_raises_sometimes,
        0,
        [("x", F32, [-1, 4]), ("shape", "TYPE_INT64", [2])],
        [("y", F32, [-1, -1])],
    ),
    (
        om.build_add_sub,
        4,
        [("INPUT0", "TYPE_INT32", [16]), ("INPUT1", "TYPE_INT32", [16])],
        [("OUTPUT0", "TYPE_INT32", [16]), ("OUTPUT1", "TYPE_INT32", [16])],
    ),
]


@pytest.mark.parametrize(
    ("builder", "max_batch_size", "inputs", "outputs"),
    COMPLETIONS,
    ids=[b.__name__.removeprefix("build_") for b, *_ in COMPLETIONS],
)
def test_messy_graph_completes_as_expected(
    tmp_path: pathlib.Path,
    builder: Builder,
    max_batch_size: int,
    inputs: list[TensorRow],
    outputs: list[TensorRow],
) -> None:
    name = builder.__name__.removeprefix("build_")
    config, runtime, _ = _load(_model_dir(tmp_path, name, builder))
    assert config.name == name
    assert config.platform == "onnxruntime_onnx"
    assert config.max_batch_size == max_batch_size
    assert _rows(config.input) == inputs
    assert _rows(config.output) == outputs
    assert [(g.count, g.kind) for g in config.instance_group] == [
        (1, mc.ModelInstanceGroup.KIND_CPU)
    ]
    assert runtime.providers == ["CPUExecutionProvider"]
    assert runtime.degraded_reason is None


def test_default_max_batch_size_comes_from_the_options(tmp_path: pathlib.Path) -> None:
    config, _, notes = _load(
        _model_dir(tmp_path, "m", om.build_symbolic_batch),
        RuntimeOptions(default_max_batch_size=16),
    )
    assert config.max_batch_size == 16
    assert any("16" in n for n in notes)


def test_partial_config_keeps_its_max_batch_size_and_completes_tensors(
    tmp_path: pathlib.Path,
) -> None:
    model_dir = _model_dir(tmp_path, "m", om.build_multi_dtype_inputs, "max_batch_size: 32")
    config, _, _ = _load(model_dir)
    assert config.max_batch_size == 32
    assert _rows(config.input) == [
        ("int_in", "TYPE_INT64", [3]),
        ("bool_in", "TYPE_BOOL", [3]),
        ("float_in", F32, [3]),
    ]
    assert _rows(config.output) == [("out", F32, [3])]


def test_fixed_minus_one_batch_runs_any_batch_size(tmp_path: pathlib.Path) -> None:
    # A stored -1 must be read as dynamic, not as a literal size.
    _, runtime, _ = _load(_model_dir(tmp_path, "m", om.build_fixed_minus_one_batch))
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    (y,) = runtime.run({"x": x}, ["y"])
    np.testing.assert_array_equal(y, x * 2)


def test_com_microsoft_op_loads_and_computes_gelu(tmp_path: pathlib.Path) -> None:
    _, runtime, _ = _load(_model_dir(tmp_path, "gelu", om.build_com_microsoft_op))
    x = np.linspace(-3, 3, 16, dtype=np.float32).reshape(2, 8)
    (y,) = runtime.run({"x": x}, ["y"])
    expected = np.array(
        [0.5 * v * (1 + math.erf(v / math.sqrt(2))) for v in x.reshape(-1).tolist()],
        dtype=np.float32,
    ).reshape(2, 8)
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-6)


def test_zipmap_output_is_left_out_with_a_note(tmp_path: pathlib.Path) -> None:
    config, runtime, notes = _load(_model_dir(tmp_path, "clf", om.build_zipmap_classifier))
    assert [o.name for o in config.output] == ["label"]
    (note,) = [n for n in notes if "probabilities" in n]
    assert "non-tensor" in note
    assert "seq(map(int64,tensor(float)))" in note
    (label,) = runtime.run({"input": np.ones((2, 4), dtype=np.float32)}, ["label"])
    assert label.dtype == np.int64
    assert label.shape == (2,)


def test_zipmap_output_declared_in_config_fails_with_a_clear_reason(
    tmp_path: pathlib.Path,
) -> None:
    text = """
    max_batch_size: 4
    input [ { name: "input" data_type: TYPE_FP32 dims: [ 4 ] } ]
    output [
      { name: "label" data_type: TYPE_INT64 dims: [ ] },
      { name: "probabilities" data_type: TYPE_FP32 dims: [ 3 ] }
    ]
    """
    model_dir = _model_dir(tmp_path, "clf", om.build_zipmap_classifier, text)
    with pytest.raises(ModelLoadError) as info:
        _load(model_dir)
    message = info.value.message
    assert "'probabilities'" in message
    # The output exists; the reason must say it is not a tensor, not that it is missing.
    assert "non-tensor" in message or "seq(map(int64,tensor(float)))" in message, message


ONNX_TO_CONFIG = {
    "bool": "TYPE_BOOL",
    "uint8": "TYPE_UINT8",
    "uint16": "TYPE_UINT16",
    "uint32": "TYPE_UINT32",
    "uint64": "TYPE_UINT64",
    "int8": "TYPE_INT8",
    "int16": "TYPE_INT16",
    "int32": "TYPE_INT32",
    "int64": "TYPE_INT64",
    "float16": "TYPE_FP16",
    "float": "TYPE_FP32",
    "double": "TYPE_FP64",
    "string": "TYPE_STRING",
}


def test_all_dtypes_map_to_the_right_config_types(tmp_path: pathlib.Path) -> None:
    assert sorted(ONNX_TO_CONFIG) == sorted(t for t, _ in om.ALL_DTYPES)
    config, runtime, _ = _load(_model_dir(tmp_path, "dtypes", om.build_all_dtypes_identity))
    assert config.max_batch_size == 4
    assert _rows(config.input) == [(f"in_{t}", ONNX_TO_CONFIG[t], [2]) for t, _ in om.ALL_DTYPES]
    assert _rows(config.output) == [(f"out_{t}", ONNX_TO_CONFIG[t], [2]) for t, _ in om.ALL_DTYPES]
    feeds = {"in_string": np.array([["a", "b"]], dtype=object)}
    (out,) = runtime.run(feeds | _zero_feeds(config, skip="in_string"), ["out_string"])
    assert out.tolist() == [["a", "b"]]


# ---- contradictions between config and graph -----------------------------------------

SYMBOLIC_OK_INPUT = 'input [ { name: "x" data_type: TYPE_FP32 dims: [ 4 ] } ]'

CONTRADICTIONS: list[tuple[str, Builder, str, tuple[str, ...]]] = [
    (
        "wrong_input_data_type",
        om.build_symbolic_batch,
        'max_batch_size: 4 input [ { name: "x" data_type: TYPE_FP64 dims: [ 4 ] } ]',
        ("input 'x'", "TYPE_FP64", "TYPE_FP32"),
    ),
    (
        "wrong_output_data_type",
        om.build_symbolic_batch,
        f"max_batch_size: 4 {SYMBOLIC_OK_INPUT} "
        'output [ { name: "y" data_type: TYPE_INT32 dims: [ 4 ] } ]',
        ("output 'y'", "TYPE_INT32", "TYPE_FP32"),
    ),
    (
        "wrong_dims",
        om.build_symbolic_batch,
        'max_batch_size: 4 input [ { name: "x" data_type: TYPE_FP32 dims: [ 5 ] } ]',
        ("input 'x'", "[5]"),
    ),
    (
        "wrong_rank_batch_dim_included",
        om.build_symbolic_batch,
        'max_batch_size: 4 input [ { name: "x" data_type: TYPE_FP32 dims: [ -1, 4 ] } ]',
        ("input 'x'", "[-1, 4]"),
    ),
    (
        "wrong_output_dims",
        om.build_symbolic_batch,
        f"max_batch_size: 4 {SYMBOLIC_OK_INPUT} "
        'output [ { name: "y" data_type: TYPE_FP32 dims: [ 2, 2 ] } ]',
        ("output 'y'", "[2, 2]"),
    ),
    (
        "config_input_not_in_graph",
        om.build_symbolic_batch,
        'max_batch_size: 4 input [ { name: "x" data_type: TYPE_FP32 dims: [ 4 ] }, '
        '{ name: "z" data_type: TYPE_FP32 dims: [ 4 ] } ]',
        ("input 'z'",),
    ),
    (
        "config_output_not_in_graph",
        om.build_symbolic_batch,
        f"max_batch_size: 4 {SYMBOLIC_OK_INPUT} "
        'output [ { name: "nope" data_type: TYPE_FP32 dims: [ 4 ] } ]',
        ("output 'nope'",),
    ),
    (
        "graph_input_missing_from_config",
        om.build_multi_dtype_inputs,
        'max_batch_size: 4 input [ { name: "int_in" data_type: TYPE_INT64 dims: [ 3 ] }, '
        '{ name: "float_in" data_type: TYPE_FP32 dims: [ 3 ] } ]',
        ("'bool_in'",),
    ),
    (
        "max_batch_size_on_non_batch_model",
        om.build_non_batch_first_dim,
        'max_batch_size: 2 input [ { name: "x" data_type: TYPE_FP32 dims: [ 4 ] } ]',
        ("input 'x'", "max_batch_size", "[3, 4]"),
    ),
    (
        "max_batch_size_on_non_batch_model_without_tensors",
        om.build_non_batch_first_dim,
        "max_batch_size: 2",
        ("'x'", "max_batch_size"),
    ),
    (
        "input_declared_twice",
        om.build_symbolic_batch,
        'max_batch_size: 4 input [ { name: "x" data_type: TYPE_FP32 dims: [ 4 ] }, '
        '{ name: "x" data_type: TYPE_FP32 dims: [ 4 ] } ]',
        ("input 'x'", "twice"),
    ),
]


@pytest.mark.parametrize(
    ("builder", "text", "fragments"),
    [c[1:] for c in CONTRADICTIONS],
    ids=[c[0] for c in CONTRADICTIONS],
)
def test_contradiction_names_the_tensor(
    tmp_path: pathlib.Path, builder: Builder, text: str, fragments: tuple[str, ...]
) -> None:
    model_dir = _model_dir(tmp_path, "m", builder, text)
    with pytest.raises(ModelLoadError) as info:
        _load(model_dir)
    for fragment in fragments:
        assert fragment in info.value.message, info.value.message


def test_explicit_config_matching_the_graph_loads(tmp_path: pathlib.Path) -> None:
    """The counterpart of the contradictions: -1 in the config matches a dynamic dim,
    max_batch_size 0 states the batch dim in full."""
    text = """
    max_batch_size: 0
    input [
      { name: "x" data_type: TYPE_FP32 dims: [ -1, 4 ] },
      { name: "scale" data_type: TYPE_FP32 dims: [ ] }
    ]
    output [ { name: "y" data_type: TYPE_FP32 dims: [ -1, 4 ] } ]
    """
    config, runtime, _ = _load(_model_dir(tmp_path, "m", om.build_scalar_input, text))
    (y,) = runtime.run(
        {"x": np.ones((3, 4), dtype=np.float32), "scale": np.array(2.5, dtype=np.float32)}, ["y"]
    )
    np.testing.assert_array_equal(y, np.full((3, 4), 2.5, dtype=np.float32))
    assert config.max_batch_size == 0


# ---- version policy ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("policy", "available", "expected"),
    [
        ("", [1, 2, 3], [3]),
        ("latest { num_versions: 1 }", [1, 2, 3], [3]),
        ("latest { num_versions: 2 }", [1, 2, 3], [2, 3]),
        ("latest { num_versions: 5 }", [1, 2, 3], [1, 2, 3]),
        ("all { }", [1, 2, 3], [1, 2, 3]),
        ("specific { versions: [ 1, 3 ] }", [1, 2, 3], [1, 3]),
        ("specific { versions: [ 7 ] }", [1, 2, 3], []),
        ("", [], []),
        ("all { }", [], []),
    ],
)
def test_select_versions(policy: str, available: list[int], expected: list[int]) -> None:
    message = text_format.Parse(policy, mc.ModelVersionPolicy())
    assert select_versions(available, message) == expected


def test_version_dirs_ignore_non_versions(tmp_path: pathlib.Path) -> None:
    for name in ("1", "2", "10", "0", "01", "abc", "-3", "1.5"):
        (tmp_path / name).mkdir()
    (tmp_path / "7").write_text("a file, not a version folder", encoding="utf-8")
    assert version_dirs(tmp_path) == [1, 2, 10]


def test_version_dirs_ignore_non_ascii_digit_names(tmp_path: pathlib.Path) -> None:
    # str.isdigit() is true for "²", which int() rejects: one odd folder name
    # must not break scanning the whole repository.
    for name in ("1", "²"):
        (tmp_path / name).mkdir()
    assert version_dirs(tmp_path) == [1]


def test_manager_scan_applies_version_policies(tmp_path: pathlib.Path) -> None:
    _model_dir(tmp_path, "latest", om.build_symbolic_batch, "", versions=(1, 2, 3))
    _model_dir(
        tmp_path,
        "latest2",
        om.build_symbolic_batch,
        "version_policy: { latest: { num_versions: 2 } }",
        versions=(1, 2, 3),
    )
    _model_dir(
        tmp_path, "all", om.build_symbolic_batch, "version_policy: { all: {} }", versions=(1, 2, 3)
    )
    _model_dir(
        tmp_path,
        "specific",
        om.build_symbolic_batch,
        "version_policy: { specific: { versions: [ 1, 3 ] } }",
        versions=(1, 2, 3),
    )
    junk = tmp_path / "junk_only"
    for name in ("0", "01", "abc"):
        om.build_symbolic_batch(junk / name / "model.onnx")
    _model_dir(
        tmp_path,
        "specific_missing",
        om.build_symbolic_batch,
        "version_policy: { specific: { versions: [ 5 ] } }",
        versions=(1,),
    )

    aspired = ModelManager(tmp_path, ExecutorLoader(RuntimeOptions())).scan()
    chosen = {name: sorted(a.versions) for name, a in aspired.items()}
    assert chosen == {
        "latest": [3],
        "latest2": [2, 3],
        "all": [1, 2, 3],
        "specific": [1, 3],
        "junk_only": [],
        "specific_missing": [],
    }
    assert "no version" in aspired["junk_only"].reason
    assert "no version" in aspired["specific_missing"].reason


# ---- execution providers -------------------------------------------------------------

GPU_PBTXT = "instance_group [ { count: 1 kind: KIND_GPU gpus: [ 0 ] } ]\n"


@pytest.mark.skipif(HAS_CUDA, reason="checks the behaviour without a CUDA provider")
@pytest.mark.filterwarnings(ORT_MISSING_PROVIDER)
def test_gpu_kind_without_cuda_fails_by_default(tmp_path: pathlib.Path) -> None:
    model_dir = _model_dir(tmp_path, "gpu", om.build_symbolic_batch, GPU_PBTXT)
    with pytest.raises(ModelLoadError) as info:
        _load(model_dir)
    message = info.value.message
    assert "CUDAExecutionProvider" in message
    assert "execution_provider_fallback" in message  # says how to get past it


@pytest.mark.skipif(HAS_CUDA, reason="checks the behaviour without a CUDA provider")
@pytest.mark.filterwarnings(ORT_MISSING_PROVIDER)
@pytest.mark.parametrize("how", ["model_parameter", "server_option"])
def test_gpu_kind_falls_back_to_cpu_when_allowed(tmp_path: pathlib.Path, how: str) -> None:
    text = GPU_PBTXT
    options = RuntimeOptions()
    if how == "model_parameter":
        text += 'parameters { key: "execution_provider_fallback" value: { string_value: "cpu" } }'
    else:
        options = RuntimeOptions(provider_fallback="cpu")
    model_dir = _model_dir(tmp_path, "gpu", om.build_symbolic_batch, text)
    _, runtime, _ = _load(model_dir, options)
    assert runtime.providers == ["CPUExecutionProvider"]
    assert runtime.degraded_reason is not None
    assert "CUDAExecutionProvider" in runtime.degraded_reason
    assert "cpu" in runtime.degraded_reason.lower()
    x = np.ones((1, 4), dtype=np.float32)
    np.testing.assert_array_equal(runtime.run({"x": x}, ["y"])[0], x * 2)


@pytest.mark.skipif(HAS_CUDA, reason="checks the behaviour without a CUDA provider")
@pytest.mark.filterwarnings(ORT_MISSING_PROVIDER)
def test_model_parameter_fail_overrides_server_cpu_fallback(tmp_path: pathlib.Path) -> None:
    text = GPU_PBTXT + (
        'parameters { key: "execution_provider_fallback" value: { string_value: "fail" } }'
    )
    model_dir = _model_dir(tmp_path, "gpu", om.build_symbolic_batch, text)
    with pytest.raises(ModelLoadError, match="CUDAExecutionProvider"):
        _load(model_dir, RuntimeOptions(provider_fallback="cpu"))


@pytest.mark.skipif(HAS_CUDA, reason="checks the behaviour without a CUDA provider")
@pytest.mark.filterwarnings(ORT_MISSING_PROVIDER)
@pytest.mark.parametrize(
    ("text", "provider"),
    [
        (
            "optimization { execution_accelerators { gpu_execution_accelerator "
            '[ { name: "tensorrt" } ] } }',
            "TensorrtExecutionProvider",
        ),
        (
            "optimization { execution_accelerators { cpu_execution_accelerator "
            '[ { name: "openvino" } ] } }',
            "OpenVINOExecutionProvider",
        ),
    ],
)
def test_missing_accelerator_fails_naming_it(
    tmp_path: pathlib.Path, text: str, provider: str
) -> None:
    model_dir = _model_dir(tmp_path, "acc", om.build_symbolic_batch, text)
    with pytest.raises(ModelLoadError, match=provider):
        _load(model_dir)


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        (
            'parameters { key: "execution_provider_fallback" value: { string_value: "maybe" } }',
            "'maybe'",
        ),
        (
            "optimization { execution_accelerators { gpu_execution_accelerator "
            '[ { name: "warp_drive" } ] } }',
            "'warp_drive'",
        ),
    ],
)
def test_invalid_provider_settings_are_rejected(
    tmp_path: pathlib.Path, text: str, fragment: str
) -> None:
    model_dir = _model_dir(tmp_path, "m", om.build_symbolic_batch, text)
    with pytest.raises(ModelLoadError) as info:
        _load(model_dir)
    assert fragment in info.value.message


# ---- thread budget -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("groups", "cores", "parameter", "instances", "threads"),
    [
        ("instance_group [ { count: 2 kind: KIND_CPU } ]", 4, None, 2, 2),
        ("instance_group [ { count: 1 kind: KIND_CPU } ]", 4, None, 1, 4),
        ("", 4, None, 1, 4),
        (
            "instance_group [ { count: 1 kind: KIND_CPU }, { count: 3 kind: KIND_CPU } ]",
            4,
            None,
            4,
            1,
        ),
        ("instance_group [ { count: 3 kind: KIND_CPU } ]", 2, None, 3, 1),
        ("instance_group [ { count: 2 kind: KIND_CPU } ]", 4, "3", 2, 3),
    ],
)
def test_intra_op_thread_budget(
    tmp_path: pathlib.Path,
    groups: str,
    cores: int,
    parameter: str | None,
    instances: int,
    threads: int,
) -> None:
    text = groups
    if parameter is not None:
        text += (
            f'\nparameters {{ key: "intra_op_thread_count" '
            f'value: {{ string_value: "{parameter}" }} }}'
        )
    model_dir = _model_dir(tmp_path, "m", om.build_symbolic_batch, text)
    _, runtime, _ = _load(model_dir, RuntimeOptions(cores=cores))
    assert runtime.instance_count == instances
    sessions = _sessions(runtime)
    assert len({id(s) for s in sessions}) == instances
    assert [s.get_session_options().intra_op_num_threads for s in sessions] == [threads] * instances


# ---- warm-up -------------------------------------------------------------------------


def test_configured_warmup_that_fails_fails_the_load(tmp_path: pathlib.Path) -> None:
    # x [2, 4] holds 8 elements; the shape file asks for [3, 3]: Reshape really fails.
    text = """
    model_warmup [ {
      name: "bad_shape"
      inputs { key: "x" value: { data_type: TYPE_FP32 dims: [ 2, 4 ] zero_data: true } }
      inputs { key: "shape" value: { data_type: TYPE_INT64 dims: [ 2 ] input_data_file: "shape" } }
    } ]
    """
    model_dir = _model_dir(tmp_path, "raises", om.build_raises_sometimes, text)
    (model_dir / "warmup").mkdir()
    (model_dir / "warmup" / "shape").write_bytes(np.array([3, 3], dtype=np.int64).tobytes())
    with pytest.raises(ModelLoadError) as info:
        _load(model_dir)
    assert "warm-up" in info.value.message
    assert "bad_shape" in info.value.message


def test_configured_warmup_that_works_lets_the_load_pass(tmp_path: pathlib.Path) -> None:
    text = """
    model_warmup [ {
      name: "good_shape"
      count: 2
      inputs { key: "x" value: { data_type: TYPE_FP32 dims: [ 2, 4 ] random_data: true } }
      inputs { key: "shape" value: { data_type: TYPE_INT64 dims: [ 2 ] input_data_file: "shape" } }
    } ]
    """
    model_dir = _model_dir(tmp_path, "raises", om.build_raises_sometimes, text)
    (model_dir / "warmup").mkdir()
    (model_dir / "warmup" / "shape").write_bytes(np.array([4, 2], dtype=np.int64).tobytes())
    config, _, _ = _load(model_dir)
    assert config.max_batch_size == 0


def test_configured_warmup_with_a_missing_data_file_fails_the_load(
    tmp_path: pathlib.Path,
) -> None:
    text = """
    model_warmup [ {
      name: "no_file"
      inputs { key: "x" value: { data_type: TYPE_FP32 dims: [ 2, 4 ] zero_data: true } }
      inputs { key: "shape" value: { data_type: TYPE_INT64 dims: [ 2 ] input_data_file: "nope" } }
    } ]
    """
    model_dir = _model_dir(tmp_path, "raises", om.build_raises_sometimes, text)
    with pytest.raises(ModelLoadError, match="nope"):
        _load(model_dir)


def test_generated_warmup_failure_only_logs(
    tmp_path: pathlib.Path, caplog: pytest.LogCaptureFixture
) -> None:
    model_dir = _model_dir(tmp_path, "allowzero", _build_reshape_allowzero)
    with caplog.at_level(logging.WARNING, logger="sluice.runtime.warmup"):
        config, runtime, _ = _load(model_dir)
    warnings = [r.getMessage() for r in caplog.records if r.name == "sluice.runtime.warmup"]
    assert len(warnings) == 1, warnings
    assert "warm-up" in warnings[0]
    assert "'allowzero'" in warnings[0]
    # The model itself is fine with sensible inputs.
    assert config.max_batch_size == 0
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    (y,) = runtime.run({"x": x, "shape": np.array([4, 2], dtype=np.int64)}, ["y"])
    np.testing.assert_array_equal(y, x.reshape(4, 2))


def test_same_graph_with_failing_configured_warmup_fails(tmp_path: pathlib.Path) -> None:
    """The generated warm-up's zeros, stated as a configured warm-up, fail the load:
    the difference between the two tests above is the policy, not the data."""
    text = """
    model_warmup [ {
      name: "zeros"
      inputs { key: "x" value: { data_type: TYPE_FP32 dims: [ 1, 4 ] zero_data: true } }
      inputs { key: "shape" value: { data_type: TYPE_INT64 dims: [ 2 ] zero_data: true } }
    } ]
    """
    model_dir = _model_dir(tmp_path, "allowzero", _build_reshape_allowzero, text)
    with pytest.raises(ModelLoadError, match="warm-up"):
        _load(model_dir)
