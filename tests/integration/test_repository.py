"""A whole model repository served end to end, checked with tritonclient.

One repository holds a Triton-syntax model, versioned models, every messy graph
of tests/onnx_models.py and several broken models; ONE server serves it for the
module. Good models must answer like onnxruntime itself; broken ones must stay
out of the way (the server still starts) and explain themselves everywhere: in
ModelReady, in ModelInfer's error, in the start-up banner and in the log.

No sluice internals here: tritonclient's protobuf descriptors clash with sluice's.
"""

from __future__ import annotations

import pathlib
import re
import threading
from collections.abc import Callable, Iterator
from typing import Any

import ml_dtypes
import numpy as np
import onnx
import onnx_models as om
import onnxruntime as ort
import pytest
import tritonclient.grpc as grpcclient
from conftest import ServerProcess
from onnx import TensorProto, helper, numpy_helper
from tritonclient.utils import InferenceServerException, np_to_triton_dtype

Builder = Callable[[pathlib.Path], None]
Feeds = dict[str, np.ndarray[Any, Any]]

BF16 = np.dtype(ml_dtypes.bfloat16)
_BANNER = re.compile(r"ready: grpc ([\d.]+):(\d+), http [\d.]+:(\d+)")


class RepositoryServer(ServerProcess):
    """A ServerProcess whose output can be waited on: the banner is printed after
    the ready line, and log lines are read by another thread, so tests wait for
    the lines they need (an event per line read) instead of racing the readers."""

    def __init__(self, repository: pathlib.Path, extra_args: list[str]) -> None:
        self._changed = threading.Condition()
        self._closed = 0
        super().__init__(repository, extra_args)
        if not self.wait_for(lambda: any(line.startswith("try: ") for line in self.stdout_lines)):
            self.stop()
            raise RuntimeError("the banner did not end:\n" + "".join(self.stdout_lines))

    def _read_stdout(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._changed:
                self.stdout_lines.append(line)
                m = _BANNER.search(line)
                if m:
                    self.grpc_port, self.http_port = int(m.group(2)), int(m.group(3))
                    self._ready.set()
                self._changed.notify_all()
        self._ready.set()
        with self._changed:
            self._closed += 1
            self._changed.notify_all()

    def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            with self._changed:
                self.stderr_lines.append(line)
                self._changed.notify_all()
        with self._changed:
            self._closed += 1
            self._changed.notify_all()

    def wait_for(self, predicate: Callable[[], bool], timeout_s: float = 30) -> bool:
        """Waits until predicate() holds (re-checked on every line read) or both
        streams are closed; returns the predicate's final value."""
        with self._changed:
            self._changed.wait_for(lambda: predicate() or self._closed == 2, timeout_s)
            return predicate()

    def banner_line(self, model: str) -> str:
        prefix = f"  {model}: "
        lines = [line for line in self.stdout_lines if line.startswith(prefix)]
        assert len(lines) == 1, "".join(self.stdout_lines)
        return lines[0].rstrip("\n").removeprefix(prefix)


# ---- the repository ------------------------------------------------------------------

SIMPLE_PBTXT = """\
name: "simple"
platform: "onnxruntime_onnx"
max_batch_size: 8
version_policy: { latest: { num_versions: 1 } }
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
dynamic_batching { }
"""

GPU_PBTXT = "instance_group [ { count: 1 kind: KIND_GPU } ]\n"

MESSY: dict[str, Builder] = {
    "symbolic_batch": om.build_symbolic_batch,
    "unnamed_dynamic": om.build_unnamed_dynamic,
    "fixed_minus_one_batch": om.build_fixed_minus_one_batch,
    "mismatched_dim_names": om.build_mismatched_dim_names,
    "multi_dtype_inputs": om.build_multi_dtype_inputs,
    "scalar_input": om.build_scalar_input,
    "non_batch_first_dim": om.build_non_batch_first_dim,
    "odd_output_names": om.build_odd_output_names,
    "com_microsoft_op": om.build_com_microsoft_op,
    "zipmap_classifier": om.build_zipmap_classifier,
    "all_dtypes_identity": om.build_all_dtypes_identity,
    "bf16_identity": om.build_bf16_identity,
    "raises_sometimes": om.build_raises_sometimes,
    "add_sub": om.build_add_sub,
}

# Broken model -> fragments its reason must contain wherever it is reported.
BROKEN: dict[str, tuple[str, ...]] = {
    "corrupt_onnx": ("model.onnx",),
    "contradicts_graph": ("'x'", "TYPE_FP64", "TYPE_FP32"),
    "unparseable_config": ("config.pbtxt",),
    "no_versions": ("no version",),
    "only_junk_versions": ("no version",),
    "gpu_without_fallback": ("CUDAExecutionProvider",),
}

GOOD = ["simple", "versions_all", "versions_latest", *MESSY]


def _build_scaled(path: pathlib.Path, factor: float) -> None:
    """``x`` float32 [B, 4] -> ``y`` = x * factor: versions that answer differently."""
    graph = helper.make_graph(
        [helper.make_node("Mul", ["x", "k"], ["y"])],
        "scaled",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", 4])],
        initializer=[numpy_helper.from_array(np.array(factor, dtype=np.float32), "k")],
    )
    model = helper.make_model(
        graph, ir_version=om.IR_VERSION, opset_imports=[helper.make_opsetid("", om.OPSET)]
    )
    onnx.checker.check_model(model, full_check=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(model.SerializeToString(deterministic=True))


def _write(path: pathlib.Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    repo = tmp_path_factory.mktemp("repository")
    om.build_add_sub(repo / "simple" / "1" / "model.onnx")
    _write(repo / "simple" / "config.pbtxt", SIMPLE_PBTXT)

    for name in ("versions_all", "versions_latest"):
        _build_scaled(repo / name / "1" / "model.onnx", 2.0)
        _build_scaled(repo / name / "2" / "model.onnx", 3.0)
    _write(repo / "versions_all" / "config.pbtxt", "version_policy: { all: {} }\n")

    for name, builder in MESSY.items():
        builder(repo / name / "1" / "model.onnx")

    corrupt = repo / "corrupt_onnx" / "1" / "model.onnx"
    corrupt.parent.mkdir(parents=True)
    corrupt.write_bytes(np.random.default_rng(7).bytes(4096))

    om.build_symbolic_batch(repo / "contradicts_graph" / "1" / "model.onnx")
    _write(
        repo / "contradicts_graph" / "config.pbtxt",
        'max_batch_size: 4\ninput [ { name: "x" data_type: TYPE_FP64 dims: [ 4 ] } ]\n',
    )

    om.build_symbolic_batch(repo / "unparseable_config" / "1" / "model.onnx")
    _write(repo / "unparseable_config" / "config.pbtxt", "max_batch_size: [ oops\n")

    (repo / "no_versions").mkdir()
    for junk in ("0", "01", "abc"):
        om.build_symbolic_batch(repo / "only_junk_versions" / junk / "model.onnx")

    om.build_symbolic_batch(repo / "gpu_without_fallback" / "1" / "model.onnx")
    _write(repo / "gpu_without_fallback" / "config.pbtxt", GPU_PBTXT)
    return repo


@pytest.fixture(scope="module")
def server(repository: pathlib.Path) -> Iterator[RepositoryServer]:
    # Not strict: this server holds broken models on purpose and is still ready.
    s = RepositoryServer(repository, ["--strict-readiness", "false"])
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server: RepositoryServer) -> Iterator[grpcclient.InferenceServerClient]:
    c = grpcclient.InferenceServerClient(server.url)
    yield c
    c.close()


# ---- requests ------------------------------------------------------------------------


def _infer(
    client: grpcclient.InferenceServerClient,
    model: str,
    feeds: Feeds,
    version: str = "",
    outputs: list[str] | None = None,
) -> grpcclient.InferResult:
    inputs = []
    for name, arr in feeds.items():
        datatype = "BF16" if arr.dtype == BF16 else np_to_triton_dtype(arr.dtype)
        inp = grpcclient.InferInput(name, list(arr.shape), datatype)
        inp.set_data_from_numpy(arr)
        inputs.append(inp)
    requested = None if outputs is None else [grpcclient.InferRequestedOutput(o) for o in outputs]
    return client.infer(model, inputs, model_version=version, outputs=requested)


def _infer_error(
    client: grpcclient.InferenceServerClient, model: str, version: str = ""
) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as info:
        _infer(client, model, {"x": np.zeros((1, 4), dtype=np.float32)}, version)
    return info.value


def _feeds(model: str) -> Feeds:
    """Inputs for each messy graph (a batch of 2 where the model batches)."""
    rng = np.random.default_rng(11)
    f32 = np.float32
    if model in ("symbolic_batch", "unnamed_dynamic", "fixed_minus_one_batch", "odd_output_names"):
        return {"x": np.arange(8, dtype=f32).reshape(2, 4) - 3.5}
    if model == "mismatched_dim_names":
        return {"x": np.linspace(-2, 2, 10, dtype=f32).reshape(2, 5)}
    if model == "multi_dtype_inputs":
        return {
            "int_in": np.array([[1, -2, 3], [40, 50, -60]], dtype=np.int64),
            "bool_in": np.array([[True, False, True], [False, True, True]]),
            "float_in": np.array([[0.5, 1.5, 2.5], [-1.0, 0.0, 1.0]], dtype=f32),
        }
    if model == "scalar_input":
        return {"x": rng.standard_normal((3, 4)).astype(f32), "scale": np.array(1.5, dtype=f32)}
    if model == "non_batch_first_dim":
        return {"x": rng.standard_normal((3, 4)).astype(f32)}
    if model == "com_microsoft_op":
        return {"x": np.linspace(-3, 3, 16, dtype=f32).reshape(2, 8)}
    if model == "zipmap_classifier":
        return {"input": rng.standard_normal((3, 4)).astype(f32)}
    if model == "all_dtypes_identity":
        feeds: Feeds = {}
        for t, elem in om.ALL_DTYPES:
            if t == "string":
                feeds[f"in_{t}"] = np.array([["a", "bc"], ["", "déjà vu"]], dtype=object)
            elif t == "bool":
                feeds[f"in_{t}"] = np.array([[True, False], [False, True]])
            else:
                dtype = helper.tensor_dtype_to_np_dtype(elem)
                feeds[f"in_{t}"] = np.array([[0, 1], [7, 100]], dtype=dtype)
        return feeds
    if model == "bf16_identity":
        return {"in_bfloat16": np.array([[1.0, -2.5], [0.15625, 384.0]], dtype=ml_dtypes.bfloat16)}
    if model == "raises_sometimes":
        return {
            "x": np.arange(8, dtype=f32).reshape(2, 4),
            "shape": np.array([4, 2], dtype=np.int64),
        }
    if model == "add_sub":
        return {
            "INPUT0": np.arange(32, dtype=np.int32).reshape(2, 16),
            "INPUT1": np.full((2, 16), 3, dtype=np.int32),
        }
    raise AssertionError(f"no inputs for {model}")


def _onnxruntime(path: pathlib.Path, feeds: Feeds, outputs: list[str]) -> list[Any]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    result: list[Any] = session.run(outputs, feeds)
    return result


def _assert_same(got: np.ndarray[Any, Any], want: np.ndarray[Any, Any], name: str) -> None:
    assert got.shape == want.shape, name
    if want.dtype == BF16:
        assert got.dtype == BF16, name
        np.testing.assert_array_equal(got.astype(np.float32), want.astype(np.float32))
    elif want.dtype == object:
        assert [v.decode("utf-8") for v in got.reshape(-1)] == list(want.reshape(-1)), name
    elif want.dtype.kind == "f":
        assert got.dtype == want.dtype, name
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=0, err_msg=name)
    else:
        assert got.dtype == want.dtype, name
        np.testing.assert_array_equal(got, want, err_msg=name)


# ---- the server as a whole -----------------------------------------------------------


def test_server_starts_ready_despite_broken_models(
    client: grpcclient.InferenceServerClient,
) -> None:
    assert client.is_server_live()
    assert client.is_server_ready()


def test_banner_lists_every_model(server: RepositoryServer) -> None:
    for name in ["simple", *MESSY]:
        assert server.banner_line(name) == "READY (versions 1)"
    assert server.banner_line("versions_all") == "READY (versions 1, 2)"
    assert server.banner_line("versions_latest") == "READY (versions 2)"
    for name in BROKEN:
        assert server.banner_line(name).startswith("UNAVAILABLE: ")


def test_unknown_model_is_not_found(client: grpcclient.InferenceServerClient) -> None:
    error = _infer_error(client, "no_such_model")
    assert error.status() == "StatusCode.NOT_FOUND"
    assert "no_such_model" in error.message()


# ---- good models ---------------------------------------------------------------------


@pytest.mark.parametrize("model", GOOD)
def test_good_model_is_ready(client: grpcclient.InferenceServerClient, model: str) -> None:
    assert client.is_model_ready(model)


def test_triton_simple_model_uses_its_config(client: grpcclient.InferenceServerClient) -> None:
    config = client.get_model_config("simple", as_json=True)["config"]
    assert config["name"] == "simple"
    assert config["platform"] == "onnxruntime_onnx"
    assert config["max_batch_size"] == 8
    assert [(i["name"], i["data_type"], i["dims"]) for i in config["input"]] == [
        ("INPUT0", "TYPE_INT32", ["16"]),
        ("INPUT1", "TYPE_INT32", ["16"]),
    ]
    assert [(g.get("count"), g.get("kind")) for g in config["instance_group"]] == [(2, "KIND_CPU")]
    assert "dynamic_batching" in config
    metadata = client.get_model_metadata("simple", as_json=True)
    assert [(t["name"], t["datatype"], t["shape"]) for t in metadata["inputs"]] == [
        ("INPUT0", "INT32", ["-1", "16"]),
        ("INPUT1", "INT32", ["-1", "16"]),
    ]


@pytest.mark.parametrize("batch", [1, 8])
def test_triton_simple_model_answers_like_triton(
    client: grpcclient.InferenceServerClient, batch: int
) -> None:
    # Triton's simple_grpc_infer_client.py, at batch 1 and at the config's max of 8
    # (more than the auto-complete default of 4: the config's value is in force).
    input0 = np.tile(np.arange(16, dtype=np.int32), (batch, 1))
    input1 = np.ones((batch, 16), dtype=np.int32)
    result = _infer(client, "simple", {"INPUT0": input0, "INPUT1": input1})
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), input0 + input1)
    np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), input0 - input1)


def test_triton_simple_model_rejects_more_than_its_max_batch(
    client: grpcclient.InferenceServerClient,
) -> None:
    big = np.zeros((9, 16), dtype=np.int32)
    with pytest.raises(InferenceServerException) as info:
        _infer(client, "simple", {"INPUT0": big, "INPUT1": big})
    assert info.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "8" in info.value.message()


@pytest.mark.parametrize("model", list(MESSY))
def test_messy_graph_answers_like_onnxruntime(
    client: grpcclient.InferenceServerClient, repository: pathlib.Path, model: str
) -> None:
    feeds = _feeds(model)
    metadata = client.get_model_metadata(model, as_json=True)
    served = [o["name"] for o in metadata["outputs"]]
    path = repository / model / "1" / "model.onnx"
    if model == "bf16_identity":
        # numpy cannot feed bfloat16 to onnxruntime; Identity's reference is its input.
        expected = [feeds["in_bfloat16"]]
        assert metadata["outputs"][0]["datatype"] == "BF16"
    else:
        expected = _onnxruntime(path, feeds, served)
    result = _infer(client, model, feeds)
    graph_outputs = [o.name for o in onnx.load(path).graph.output]
    if model == "zipmap_classifier":
        assert served == ["label"]
    else:
        assert served == graph_outputs  # odd names survive verbatim
    response_names = [o.name for o in result.get_response().outputs]
    assert response_names == served
    for name, want in zip(served, expected, strict=True):
        _assert_same(result.as_numpy(name), np.asarray(want), name)


@pytest.mark.parametrize(
    ("model", "max_batch_size", "input_shapes"),
    [
        ("symbolic_batch", 4, {"x": ["-1", "4"]}),
        ("fixed_minus_one_batch", 4, {"x": ["-1", "4"]}),
        ("scalar_input", 0, {"x": ["-1", "4"], "scale": []}),
        ("non_batch_first_dim", 0, {"x": ["3", "4"]}),
        ("raises_sometimes", 0, {"x": ["-1", "4"], "shape": ["2"]}),
    ],
)
def test_messy_graph_metadata(
    client: grpcclient.InferenceServerClient,
    model: str,
    max_batch_size: int,
    input_shapes: dict[str, list[str]],
) -> None:
    config = client.get_model_config(model, as_json=True)["config"]
    assert config.get("max_batch_size", 0) == max_batch_size
    metadata = client.get_model_metadata(model, as_json=True)
    assert {t["name"]: t.get("shape", []) for t in metadata["inputs"]} == input_shapes


def test_zipmap_probabilities_cannot_be_requested(
    client: grpcclient.InferenceServerClient,
) -> None:
    with pytest.raises(InferenceServerException) as info:
        _infer(client, "zipmap_classifier", _feeds("zipmap_classifier"), outputs=["probabilities"])
    assert info.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "probabilities" in info.value.message()


def test_model_failing_at_run_time_fails_only_that_request(
    client: grpcclient.InferenceServerClient,
) -> None:
    bad: Feeds = {
        "x": np.zeros((2, 4), dtype=np.float32),
        "shape": np.array([3, 3], dtype=np.int64),
    }
    with pytest.raises(InferenceServerException) as info:
        _infer(client, "raises_sometimes", bad)
    assert "raises_sometimes" in info.value.message()
    good = _infer(client, "raises_sometimes", _feeds("raises_sometimes"))
    assert good.as_numpy("y").shape == (4, 2)


# ---- versions ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "version", "factor"),
    [
        ("versions_all", "1", 2.0),
        ("versions_all", "2", 3.0),
        ("versions_all", "", 3.0),
        ("versions_latest", "2", 3.0),
        ("versions_latest", "", 3.0),
    ],
)
def test_served_versions_answer(
    client: grpcclient.InferenceServerClient, model: str, version: str, factor: float
) -> None:
    assert client.is_model_ready(model, version)
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    result = _infer(client, model, {"x": x}, version)
    np.testing.assert_array_equal(result.as_numpy("y"), x * np.float32(factor))
    assert result.get_response().model_version == (version or "2")


def test_metadata_lists_the_served_versions(client: grpcclient.InferenceServerClient) -> None:
    assert client.get_model_metadata("versions_all", as_json=True)["versions"] == ["1", "2"]
    assert client.get_model_metadata("versions_latest", as_json=True)["versions"] == ["2"]


def test_version_outside_the_default_policy_is_not_found(
    client: grpcclient.InferenceServerClient,
) -> None:
    assert not client.is_model_ready("versions_latest", "1")
    error = _infer_error(client, "versions_latest", "1")
    assert error.status() == "StatusCode.NOT_FOUND"
    assert "versions_latest" in error.message()


@pytest.mark.parametrize("version", ["3", "0", "abc", pytest.param("²", id="superscript_two")])
def test_version_that_does_not_exist_is_not_found(
    client: grpcclient.InferenceServerClient, version: str
) -> None:
    error = _infer_error(client, "versions_all", version)
    assert error.status() == "StatusCode.NOT_FOUND", error.message()
    assert not client.is_model_ready("versions_all", version)


# ---- broken models -------------------------------------------------------------------


@pytest.mark.parametrize("model", list(BROKEN))
def test_broken_model_is_not_ready(client: grpcclient.InferenceServerClient, model: str) -> None:
    assert not client.is_model_ready(model)


@pytest.mark.parametrize("model", list(BROKEN))
def test_broken_model_reports_its_reason_everywhere(
    client: grpcclient.InferenceServerClient, server: RepositoryServer, model: str
) -> None:
    fragments = BROKEN[model]
    banner = server.banner_line(model)
    assert banner.startswith("UNAVAILABLE: ")
    reason = banner.removeprefix("UNAVAILABLE: ")
    for fragment in fragments:
        assert fragment in reason, reason

    error = _infer_error(client, model)
    assert error.status() == "StatusCode.UNAVAILABLE"
    assert model in error.message()
    assert reason in error.message()

    def logged() -> bool:
        return any(
            " ERROR " in line and f"'{model}'" in line and all(f in line for f in fragments)
            for line in server.stderr_lines
        )

    assert server.wait_for(logged, timeout_s=10), server.log


# ---- GPU instance groups on a CPU-only machine ----------------------------------------


@pytest.fixture(scope="module")
def fallback_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RepositoryServer]:
    repo = tmp_path_factory.mktemp("gpu_repository")
    om.build_symbolic_batch(repo / "gpu_model" / "1" / "model.onnx")
    _write(repo / "gpu_model" / "config.pbtxt", GPU_PBTXT)
    s = RepositoryServer(repo, ["--execution-provider-fallback", "cpu"])
    yield s
    s.stop()


@pytest.mark.skipif(
    "CUDAExecutionProvider" in ort.get_available_providers(),
    reason="checks the behaviour without a CUDA provider",
)
def test_gpu_model_serves_on_cpu_with_fallback(fallback_server: RepositoryServer) -> None:
    assert fallback_server.banner_line("gpu_model") == "READY (versions 1)"
    with grpcclient.InferenceServerClient(fallback_server.url) as c:
        assert c.is_model_ready("gpu_model")
        x = np.arange(8, dtype=np.float32).reshape(2, 4)
        result = _infer(c, "gpu_model", {"x": x})
        np.testing.assert_array_equal(result.as_numpy("y"), x * 2)

    def warned() -> bool:
        return any(
            " WARNING " in line and "CUDAExecutionProvider" in line and "'gpu_model'" in line
            for line in fallback_server.stderr_lines
        )

    assert fallback_server.wait_for(warned, timeout_s=10), fallback_server.log
