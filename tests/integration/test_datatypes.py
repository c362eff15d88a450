"""Every KServe v2 datatype round-trips through a real server, raw and typed.

Repository (built once per module): ``all_dtypes`` (build_all_dtypes_identity, no
config), ``bf16_identity``, ``add_sub``, and ``typed_dtypes`` -- the same identity
graph without float16. Typed ``contents`` cannot carry FP16, and all_dtypes needs
every input in one request, so typed round trips go through typed_dtypes.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import ml_dtypes
import numpy as np
import onnx
import onnx_models
import pytest
import tritonclient.grpc as grpcclient
from conftest import ServerProcess
from onnx import helper
from tritonclient.grpc import service_pb2, service_pb2_grpc

# ONNX tensor-name suffix -> (KServe wire datatype, numpy dtype)
WIRE: dict[str, tuple[str, Any]] = {
    "bool": ("BOOL", np.bool_),
    "uint8": ("UINT8", np.uint8),
    "uint16": ("UINT16", np.uint16),
    "uint32": ("UINT32", np.uint32),
    "uint64": ("UINT64", np.uint64),
    "int8": ("INT8", np.int8),
    "int16": ("INT16", np.int16),
    "int32": ("INT32", np.int32),
    "int64": ("INT64", np.int64),
    "float16": ("FP16", np.float16),
    "float": ("FP32", np.float32),
    "double": ("FP64", np.float64),
    "string": ("BYTES", np.object_),
}
SUFFIXES = [t for t, _ in onnx_models.ALL_DTYPES]
TYPED_SUFFIXES = [t for t in SUFFIXES if t != "float16"]
# Typed contents field per wire datatype (KServe v2 InferTensorContents).
CONTENTS_FIELD = {
    "BOOL": "bool_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}
UNICODE = ["", "héllo wörld", "日本語", "🚀 emoji", "a\u0000b"]


def _edge_values(suffix: str) -> np.ndarray[Any, Any]:
    """A [2, 2] tensor of awkward values for one type (extremes, NaN, -0.0, ...)."""
    dtype = np.dtype(WIRE[suffix][1])
    if suffix == "bool":
        values: list[Any] = [True, False, False, True]
    elif suffix == "string":
        values = ["", "héllo", "日本語 🚀", "plain"]
    elif dtype.kind == "u":
        info = np.iinfo(dtype)
        values = [0, int(info.max), 1, int(info.max) - 1]
    elif dtype.kind == "i":
        info = np.iinfo(dtype)
        values = [int(info.min), int(info.max), -1, 0]
    else:
        finfo = np.finfo(dtype)
        values = [float(finfo.max), -np.inf, -0.0, float(finfo.smallest_subnormal)]
    return np.array(values, dtype=dtype).reshape(2, 2)


def _filler(suffix: str) -> np.ndarray[Any, Any]:
    dtype = np.dtype(WIRE[suffix][1])
    if suffix == "string":
        return np.array(["x", "y", "z", "w"], dtype=object).reshape(2, 2)
    return np.arange(4).astype(dtype).reshape(2, 2)


def _assert_same(got: np.ndarray[Any, Any], want: np.ndarray[Any, Any]) -> None:
    """Exact equality; floats compared bit for bit (so -0.0 and NaN count)."""
    assert got.shape == want.shape
    if want.dtype == np.object_:
        as_text = [v.decode("utf-8") if isinstance(v, bytes) else v for v in got.reshape(-1)]
        assert as_text == list(want.reshape(-1))
        return
    assert got.dtype == want.dtype
    if want.dtype.kind == "f":
        bits = f"u{want.dtype.itemsize}"
        np.testing.assert_array_equal(got.view(bits), want.view(bits))
    else:
        np.testing.assert_array_equal(got, want)


def _build_identity(path: Path, suffixes: list[str]) -> None:
    elem = dict(onnx_models.ALL_DTYPES)
    graph = helper.make_graph(
        [helper.make_node("Identity", [f"in_{t}"], [f"out_{t}"]) for t in suffixes],
        "typed_dtypes_identity",
        [helper.make_tensor_value_info(f"in_{t}", elem[t], ["B", 2]) for t in suffixes],
        [helper.make_tensor_value_info(f"out_{t}", elem[t], ["B", 2]) for t in suffixes],
    )
    model = helper.make_model(
        graph, ir_version=onnx_models.IR_VERSION, opset_imports=[helper.make_opsetid("", 17)]
    )
    onnx.checker.check_model(model, full_check=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(model.SerializeToString(deterministic=True))


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, executor: str) -> Iterator[ServerProcess]:
    repo = tmp_path_factory.mktemp("dtypes_repo")
    onnx_models.build_all_dtypes_identity(repo / "all_dtypes" / "1" / "model.onnx")
    onnx_models.build_bf16_identity(repo / "bf16_identity" / "1" / "model.onnx")
    onnx_models.build_add_sub(repo / "add_sub" / "1" / "model.onnx")
    _build_identity(repo / "typed_dtypes" / "1" / "model.onnx", TYPED_SUFFIXES)
    s = ServerProcess(repo, [], executor=executor)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> Iterator[grpcclient.InferenceServerClient]:
    c = grpcclient.InferenceServerClient(server.url)
    yield c
    c.close()


@pytest.fixture(scope="module")
def stub(server: ServerProcess) -> Iterator[service_pb2_grpc.GRPCInferenceServiceStub]:
    with grpc.insecure_channel(server.url) as channel:
        yield service_pb2_grpc.GRPCInferenceServiceStub(channel)


def test_all_models_ready(client: grpcclient.InferenceServerClient) -> None:
    for model in ("all_dtypes", "bf16_identity", "add_sub", "typed_dtypes"):
        assert client.is_model_ready(model), model


def test_metadata_names_every_datatype(client: grpcclient.InferenceServerClient) -> None:
    meta = client.get_model_metadata("all_dtypes")
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == [
        (f"in_{t}", WIRE[t][0], [-1, 2]) for t in SUFFIXES
    ]
    assert [(t.name, t.datatype) for t in meta.outputs] == [
        (f"out_{t}", WIRE[t][0]) for t in SUFFIXES
    ]
    bf16 = client.get_model_metadata("bf16_identity")
    assert [(t.name, t.datatype, list(t.shape)) for t in bf16.inputs] == [
        ("in_bfloat16", "BF16", [-1, 2])
    ]


# ---- raw (tritonclient) ------------------------------------------------------------


@pytest.mark.parametrize("featured", SUFFIXES)
def test_raw_round_trip(client: grpcclient.InferenceServerClient, featured: str) -> None:
    data = {t: _edge_values(t) if t == featured else _filler(t) for t in SUFFIXES}
    inputs = []
    for t, arr in data.items():
        inp = grpcclient.InferInput(f"in_{t}", list(arr.shape), WIRE[t][0])
        inp.set_data_from_numpy(arr)
        inputs.append(inp)
    result = client.infer("all_dtypes", inputs)
    response = result.get_response()
    # FP16 has no typed form, so the server must answer in raw; it was asked in raw anyway.
    assert len(response.raw_output_contents) == len(SUFFIXES)
    assert {o.name: o.datatype for o in response.outputs} == {
        f"out_{t}": WIRE[t][0] for t in SUFFIXES
    }
    for t, want in data.items():
        _assert_same(result.as_numpy(f"out_{t}"), want)


def test_raw_bytes_empty_and_multibyte_utf8(client: grpcclient.InferenceServerClient) -> None:
    texts = np.array([*UNICODE, "ß" * 1000], dtype=object).reshape(3, 2)
    inputs = []
    for t in SUFFIXES:
        arr = texts if t == "string" else np.zeros((3, 2), dtype=WIRE[t][1])
        inp = grpcclient.InferInput(f"in_{t}", [3, 2], WIRE[t][0])
        inp.set_data_from_numpy(arr)
        inputs.append(inp)
    result = client.infer(
        "all_dtypes", inputs, outputs=[grpcclient.InferRequestedOutput("out_string")]
    )
    out = result.as_numpy("out_string")
    assert out.shape == (3, 2)
    assert [v.decode("utf-8") for v in out.reshape(-1)] == list(texts.reshape(-1))


# ---- typed contents (service_pb2) ----------------------------------------------------


def _typed_request(data: dict[str, np.ndarray[Any, Any]]) -> service_pb2.ModelInferRequest:
    request = service_pb2.ModelInferRequest(model_name="typed_dtypes")
    for t, arr in data.items():
        wire = WIRE[t][0]
        tensor = request.inputs.add(name=f"in_{t}", datatype=wire, shape=list(arr.shape))
        flat = arr.reshape(-1).tolist()
        if wire == "BYTES":
            flat = [v.encode("utf-8") for v in flat]
        getattr(tensor.contents, CONTENTS_FIELD[wire]).extend(flat)
    return request


def _typed_outputs(response: service_pb2.ModelInferResponse) -> dict[str, np.ndarray[Any, Any]]:
    out: dict[str, np.ndarray[Any, Any]] = {}
    for o in response.outputs:
        t = o.name.removeprefix("out_")
        wire, dtype = WIRE[t]
        values = list(getattr(o.contents, CONTENTS_FIELD[wire]))
        assert o.datatype == wire
        if wire == "BYTES":
            out[t] = np.array([v.decode("utf-8") for v in values], dtype=object).reshape(
                tuple(o.shape)
            )
        else:
            out[t] = np.array(values, dtype=dtype).reshape(tuple(o.shape))
    return out


@pytest.mark.parametrize("featured", TYPED_SUFFIXES)
def test_typed_contents_round_trip(
    stub: service_pb2_grpc.GRPCInferenceServiceStub, featured: str
) -> None:
    data = {t: _edge_values(t) if t == featured else _filler(t) for t in TYPED_SUFFIXES}
    response = stub.ModelInfer(_typed_request(data), timeout=30)
    assert len(response.raw_output_contents) == 0, "a typed request gets typed contents back"
    got = _typed_outputs(response)
    assert sorted(got) == sorted(data)
    for t, want in data.items():
        _assert_same(got[t], want)


def test_typed_bytes_empty_and_multibyte_utf8(
    stub: service_pb2_grpc.GRPCInferenceServiceStub,
) -> None:
    texts = np.array([*UNICODE, "ß" * 1000], dtype=object).reshape(3, 2)
    data = {t: texts if t == "string" else np.zeros((3, 2), WIRE[t][1]) for t in TYPED_SUFFIXES}
    response = stub.ModelInfer(_typed_request(data), timeout=30)
    out = {o.name: o for o in response.outputs}["out_string"]
    assert [v.decode("utf-8") for v in out.contents.bytes_contents] == list(texts.reshape(-1))


# ---- BF16 -----------------------------------------------------------------------------


def test_bf16_bits_round_trip(stub: service_pb2_grpc.GRPCInferenceServiceStub) -> None:
    bf16 = np.dtype(ml_dtypes.bfloat16)
    values = np.array([1.5, -2.0, np.inf, -np.inf, -0.0, 1.0e-40], dtype=np.float32).astype(bf16)
    # Plus two NaNs with payloads (quiet, and signalling with the sign bit set).
    values = np.concatenate([values, np.array([0x7FC1, 0xFF81], np.uint16).view(bf16)])
    arr = values.reshape(4, 2)  # max_batch_size is 4 (autocompleted)
    request = service_pb2.ModelInferRequest(model_name="bf16_identity")
    request.inputs.add(name="in_bfloat16", datatype="BF16", shape=[4, 2])
    request.raw_input_contents.append(arr.tobytes())
    response = stub.ModelInfer(request, timeout=30)
    assert [(o.name, o.datatype, list(o.shape)) for o in response.outputs] == [
        ("out_bfloat16", "BF16", [4, 2])
    ]
    assert response.raw_output_contents[0] == arr.tobytes()


def test_bf16_typed_request_is_answered_in_raw_only(
    stub: service_pb2_grpc.GRPCInferenceServiceStub,
) -> None:
    # BF16 has no contents field: a request without raw data cannot carry it.
    request = service_pb2.ModelInferRequest(model_name="bf16_identity")
    tensor = request.inputs.add(name="in_bfloat16", datatype="BF16", shape=[1, 2])
    tensor.contents.fp32_contents.extend([1.0, 2.0])
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelInfer(request, timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "in_bfloat16" in (info.value.details() or "")
    assert "raw" in (info.value.details() or "")


# ---- add_sub (Triton's "simple") --------------------------------------------------------


@pytest.mark.parametrize("batch", [1, 4])
def test_add_sub_matches_numpy(client: grpcclient.InferenceServerClient, batch: int) -> None:
    rng = np.random.default_rng(batch)
    a = rng.integers(-(2**30), 2**30, size=(batch, 16), dtype=np.int32)
    b = rng.integers(-(2**30), 2**30, size=(batch, 16), dtype=np.int32)
    inputs = []
    for name, arr in (("INPUT0", a), ("INPUT1", b)):
        inp = grpcclient.InferInput(name, [batch, 16], "INT32")
        inp.set_data_from_numpy(arr)
        inputs.append(inp)
    result = client.infer("add_sub", inputs)
    out0, out1 = result.as_numpy("OUTPUT0"), result.as_numpy("OUTPUT1")
    assert out0.dtype == np.int32
    assert out1.dtype == np.int32
    np.testing.assert_array_equal(out0, a + b)
    np.testing.assert_array_equal(out1, a - b)
