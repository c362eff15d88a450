"""Every request error gets the right gRPC status and a message that names the model
and the input (or what was expected); bad requests never disturb good ones.

One module server holds copies of the example tabular_classifier and text_echo,
add_sub, raises_sometimes, and ``broken`` -- add_sub's graph under a config that
contradicts it (INPUT0 TYPE_FP32 vs the graph's INT32), so it never becomes ready.
"""

from __future__ import annotations

import asyncio
import shutil
import struct
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import onnx_models
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as aioclient
from conftest import ServerProcess
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

EXAMPLE_MODELS = Path(__file__).resolve().parents[2] / "python" / "sluice" / "examples" / "models"
CORE_BYTES_MESSAGE = "BYTES element 0 declares 100 bytes but only 3 remain"

BROKEN_CONFIG = """\
name: "broken"
platform: "onnxruntime_onnx"
max_batch_size: 4
input [
  { name: "INPUT0" data_type: TYPE_FP32 dims: [ 16 ] },
  { name: "INPUT1" data_type: TYPE_INT32 dims: [ 16 ] }
]
"""
BROKEN_REASON = "input 'INPUT0' is TYPE_FP32 in the config but TYPE_INT32 in the model"


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = tmp_path_factory.mktemp("errors_repo")
    for model in ("tabular_classifier", "text_echo"):
        shutil.copytree(EXAMPLE_MODELS / model, repo / model)
    onnx_models.build_add_sub(repo / "add_sub" / "1" / "model.onnx")
    onnx_models.build_raises_sometimes(repo / "raises_sometimes" / "1" / "model.onnx")
    onnx_models.build_add_sub(repo / "broken" / "1" / "model.onnx")
    (repo / "broken" / "config.pbtxt").write_text(BROKEN_CONFIG)
    return repo


@pytest.fixture(scope="module")
def server(repository: Path, executor: str) -> Iterator[ServerProcess]:
    s = ServerProcess(repository, [], executor=executor)
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


# ---- helpers ------------------------------------------------------------------------


def _input(name: str, data: np.ndarray[Any, Any], datatype: str) -> grpcclient.InferInput:
    inp = grpcclient.InferInput(name, list(data.shape), datatype)
    inp.set_data_from_numpy(data)
    return inp


def _features(rows: int = 1, cols: int = 8, dtype: Any = np.float32) -> np.ndarray[Any, Any]:
    return np.random.default_rng(rows * 100 + cols).standard_normal((rows, cols)).astype(dtype)


def _add_sub_inputs(batch: int = 1) -> list[grpcclient.InferInput]:
    a = np.arange(16 * batch, dtype=np.int32).reshape(batch, 16)
    return [_input("INPUT0", a, "INT32"), _input("INPUT1", a * 2, "INT32")]


def _triton_error(call: Callable[[], object], code: grpc.StatusCode, *fragments: str) -> str:
    with pytest.raises(InferenceServerException) as info:
        call()
    assert info.value.status() == str(code), info.value
    message = info.value.message() or ""
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    return message


def _rpc_error(
    stub: service_pb2_grpc.GRPCInferenceServiceStub,
    request: service_pb2.ModelInferRequest,
    code: grpc.StatusCode,
    *fragments: str,
) -> str:
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelInfer(request, timeout=30)
    assert info.value.code() == code, info.value
    message = info.value.details() or ""
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    return message


def _bytes_request(raw: bytes) -> service_pb2.ModelInferRequest:
    request = service_pb2.ModelInferRequest(model_name="text_echo")
    request.inputs.add(name="text", datatype="BYTES", shape=[1, 1])
    request.raw_input_contents.append(raw)
    return request


def _assert_tabular_works(client: grpcclient.InferenceServerClient) -> None:
    result = client.infer("tabular_classifier", [_input("features", _features(2), "FP32")])
    probs = result.as_numpy("probabilities")
    assert probs.shape == (2, 3)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)


# ---- routing ------------------------------------------------------------------------


def test_unknown_model_is_not_found(client: grpcclient.InferenceServerClient) -> None:
    _triton_error(
        lambda: client.infer("no_such_model", [_input("features", _features(), "FP32")]),
        grpc.StatusCode.NOT_FOUND,
        "no_such_model",
    )
    _triton_error(
        lambda: client.get_model_metadata("no_such_model"),
        grpc.StatusCode.NOT_FOUND,
        "no_such_model",
    )


def test_unknown_version_is_not_found(client: grpcclient.InferenceServerClient) -> None:
    _triton_error(
        lambda: client.infer(
            "tabular_classifier", [_input("features", _features(), "FP32")], model_version="7"
        ),
        grpc.StatusCode.NOT_FOUND,
        "tabular_classifier",
        "7",
    )


# ---- input validation -------------------------------------------------------------------


def test_wrong_datatype(client: grpcclient.InferenceServerClient) -> None:
    _triton_error(
        lambda: client.infer(
            "tabular_classifier", [_input("features", _features(dtype=np.float64), "FP64")]
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "'features'",
        "'tabular_classifier'",
        "FP64",
        "FP32",
    )


def test_wrong_shape(client: grpcclient.InferenceServerClient) -> None:
    _triton_error(
        lambda: client.infer("tabular_classifier", [_input("features", _features(1, 7), "FP32")]),
        grpc.StatusCode.INVALID_ARGUMENT,
        "'features'",
        "'tabular_classifier'",
        "[-1,8]",
        "[1,7]",
    )


def test_batch_over_max_batch_size(client: grpcclient.InferenceServerClient) -> None:
    _triton_error(
        lambda: client.infer("tabular_classifier", [_input("features", _features(65), "FP32")]),
        grpc.StatusCode.INVALID_ARGUMENT,
        "'tabular_classifier'",
        "64",
        "65",
    )
    # The limit itself is accepted.
    result = client.infer("tabular_classifier", [_input("features", _features(64), "FP32")])
    assert result.as_numpy("label").shape == (64, 1)


def test_raw_byte_size_wrong(stub: service_pb2_grpc.GRPCInferenceServiceStub) -> None:
    request = service_pb2.ModelInferRequest(model_name="tabular_classifier")
    request.inputs.add(name="features", datatype="FP32", shape=[1, 8])
    request.raw_input_contents.append(b"\0" * 31)
    _rpc_error(
        stub,
        request,
        grpc.StatusCode.INVALID_ARGUMENT,
        "'features'",
        "'tabular_classifier'",
        "31",
        "32",
    )


def test_shape_whose_element_count_overflows(
    stub: service_pb2_grpc.GRPCInferenceServiceStub,
) -> None:
    # (2**61 + 1) * 8 wraps around int64 to 8: the 32 raw bytes "fit" the wrapped count.
    request = service_pb2.ModelInferRequest(model_name="tabular_classifier")
    request.inputs.add(name="features", datatype="FP32", shape=[2**61 + 1, 8])
    request.raw_input_contents.append(b"\0" * 32)
    _rpc_error(
        stub, request, grpc.StatusCode.INVALID_ARGUMENT, "'features'", "'tabular_classifier'"
    )


def test_contents_element_count_wrong(stub: service_pb2_grpc.GRPCInferenceServiceStub) -> None:
    request = service_pb2.ModelInferRequest(model_name="tabular_classifier")
    tensor = request.inputs.add(name="features", datatype="FP32", shape=[1, 8])
    tensor.contents.fp32_contents.extend([0.5] * 7)
    _rpc_error(
        stub,
        request,
        grpc.StatusCode.INVALID_ARGUMENT,
        "'features'",
        "'tabular_classifier'",
        "7",
        "8",
    )


def test_missing_input(client: grpcclient.InferenceServerClient) -> None:
    _triton_error(
        lambda: client.infer("add_sub", _add_sub_inputs()[:1]),
        grpc.StatusCode.INVALID_ARGUMENT,
        "'add_sub'",
        "'INPUT1'",
    )


def test_unknown_input(client: grpcclient.InferenceServerClient) -> None:
    extra = _input("EXTRA", np.zeros((1, 16), np.int32), "INT32")
    _triton_error(
        lambda: client.infer("add_sub", [*_add_sub_inputs(), extra]),
        grpc.StatusCode.INVALID_ARGUMENT,
        "'EXTRA'",
        "'add_sub'",
        "'INPUT0'",
        "'INPUT1'",
    )


def test_unknown_requested_output(client: grpcclient.InferenceServerClient) -> None:
    _triton_error(
        lambda: client.infer(
            "add_sub", _add_sub_inputs(), outputs=[grpcclient.InferRequestedOutput("OUTPUT9")]
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "'OUTPUT9'",
        "'add_sub'",
        "'OUTPUT0'",
    )


def test_raw_input_count_differs_from_inputs(
    stub: service_pb2_grpc.GRPCInferenceServiceStub,
) -> None:
    request = service_pb2.ModelInferRequest(model_name="add_sub")
    for name in ("INPUT0", "INPUT1"):
        request.inputs.add(name=name, datatype="INT32", shape=[1, 16])
    request.raw_input_contents.append(np.zeros(16, np.int32).tobytes())
    _rpc_error(
        stub,
        request,
        grpc.StatusCode.INVALID_ARGUMENT,
        "'add_sub'",
        "1 raw_input_contents",
        "2 inputs",
    )


# ---- BYTES ------------------------------------------------------------------------------


def test_malformed_raw_bytes_length_prefix(stub: service_pb2_grpc.GRPCInferenceServiceStub) -> None:
    # The core's message, verbatim: proof the request went through sluice._core.
    _rpc_error(
        stub,
        _bytes_request(struct.pack("<I", 100) + b"abc"),
        grpc.StatusCode.INVALID_ARGUMENT,
        CORE_BYTES_MESSAGE,
        "'text_echo'",
        "'text'",
    )


def test_raw_bytes_not_utf8(stub: service_pb2_grpc.GRPCInferenceServiceStub) -> None:
    _rpc_error(
        stub,
        _bytes_request(struct.pack("<I", 2) + b"\xff\xfe"),
        grpc.StatusCode.INVALID_ARGUMENT,
        "UTF-8",
        "'text_echo'",
        "'text'",
    )


def test_typed_bytes_not_utf8(stub: service_pb2_grpc.GRPCInferenceServiceStub) -> None:
    request = service_pb2.ModelInferRequest(model_name="text_echo")
    tensor = request.inputs.add(name="text", datatype="BYTES", shape=[1, 1])
    tensor.contents.bytes_contents.append(b"\xff\xfe")
    _rpc_error(stub, request, grpc.StatusCode.INVALID_ARGUMENT, "UTF-8", "'text_echo'", "'text'")


# ---- size limit ------------------------------------------------------------------------


def test_message_over_size_limit_is_resource_exhausted(
    start_server: Callable[..., ServerProcess],
) -> None:
    server = start_server(None, "--grpc-max-message-bytes", "65536")
    client = grpcclient.InferenceServerClient(server.url)
    try:
        big = np.array([["x" * 100_000]], dtype=object)
        _triton_error(
            lambda: client.infer("text_echo", [_input("text", big, "BYTES")]),
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "65536",
        )
        # The server goes on serving requests under the limit.
        small = np.array([["y" * 30_000]], dtype=object)
        result = client.infer("text_echo", [_input("text", small, "BYTES")])
        assert result.as_numpy("text_out")[0, 0] == b"y" * 30_000
    finally:
        client.close()


# ---- run-time failure ------------------------------------------------------------------


def _reshape_inputs(shape: list[int]) -> tuple[np.ndarray[Any, Any], list[grpcclient.InferInput]]:
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    return x, [_input("x", x, "FP32"), _input("shape", np.array(shape, np.int64), "INT64")]


def test_model_raising_at_run_time_is_internal_for_that_request_only(
    client: grpcclient.InferenceServerClient,
) -> None:
    _, bad = _reshape_inputs([3, 3])
    _triton_error(
        lambda: client.infer("raises_sometimes", bad),
        grpc.StatusCode.INTERNAL,
        "'raises_sometimes'",
    )
    x, good = _reshape_inputs([4, 2])
    result = client.infer("raises_sometimes", good)
    np.testing.assert_array_equal(result.as_numpy("y"), x.reshape(4, 2))


# ---- model not ready ------------------------------------------------------------------


def test_model_not_ready_is_unavailable(
    server: ServerProcess, client: grpcclient.InferenceServerClient
) -> None:
    assert client.is_server_ready() is True
    assert client.is_model_ready("broken") is False
    message = _triton_error(
        lambda: client.infer("broken", _add_sub_inputs()),
        grpc.StatusCode.UNAVAILABLE,
        "'broken'",
        BROKEN_REASON,
    )
    assert "not ready" in message
    _triton_error(
        lambda: client.get_model_metadata("broken"), grpc.StatusCode.UNAVAILABLE, "'broken'"
    )
    with grpc.insecure_channel(server.url) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        reply = health.Check(health_pb2.HealthCheckRequest(service="broken"), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING
    # Other models still serve.
    result = client.infer("add_sub", _add_sub_inputs(2))
    a = np.arange(32, dtype=np.int32).reshape(2, 16)
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), a * 3)
    _assert_tabular_works(client)


# ---- bad requests never disturb good ones ------------------------------------------------


def test_concurrent_bad_and_good_requests(server: ServerProcess) -> None:
    good_data = {i: _features(1 + i % 4, 8) + np.float32(i) for i in range(24)}

    async def main() -> tuple[dict[int, Any], list[BaseException | Any]]:
        client = aioclient.InferenceServerClient(server.url)
        try:

            async def good(i: int) -> Any:
                inp = aioclient.InferInput("features", list(good_data[i].shape), "FP32")
                inp.set_data_from_numpy(good_data[i])
                return await client.infer("tabular_classifier", [inp], request_id=f"g{i}")

            async def bad(i: int) -> Any:
                kind = i % 4
                if kind == 0:  # wrong shape
                    data = _features(1, 7)
                    inp = aioclient.InferInput("features", [1, 7], "FP32")
                    inp.set_data_from_numpy(data)
                    return await client.infer("tabular_classifier", [inp])
                if kind == 1:  # unknown model
                    inp = aioclient.InferInput("features", [1, 8], "FP32")
                    inp.set_data_from_numpy(_features())
                    return await client.infer("no_such_model", [inp])
                if kind == 2:  # fails inside onnxruntime
                    x = aioclient.InferInput("x", [2, 4], "FP32")
                    x.set_data_from_numpy(np.zeros((2, 4), np.float32))
                    shape = aioclient.InferInput("shape", [2], "INT64")
                    shape.set_data_from_numpy(np.array([3, 3], np.int64))
                    return await client.infer("raises_sometimes", [x, shape])
                inp = aioclient.InferInput("INPUT0", [1, 16], "INT32")  # missing INPUT1
                inp.set_data_from_numpy(np.zeros((1, 16), np.int32))
                return await client.infer("add_sub", [inp])

            goods = [good(i) for i in good_data]
            bads = [bad(i) for i in range(24)]
            # Interleave so bad and good requests are in flight together.
            mixed = [c for pair in zip(goods, bads, strict=True) for c in pair]
            results = await asyncio.gather(*mixed, return_exceptions=True)
            return dict(zip(good_data, results[0::2], strict=True)), results[1::2]
        finally:
            await client.close()

    good_results, bad_results = asyncio.run(main())
    for i, result in good_results.items():
        assert not isinstance(result, BaseException), result
        assert result.get_response().id == f"g{i}"
        probs = result.as_numpy("probabilities")
        assert probs.shape == (good_data[i].shape[0], 3)
        np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)
    expected_status = {
        0: grpc.StatusCode.INVALID_ARGUMENT,
        1: grpc.StatusCode.NOT_FOUND,
        2: grpc.StatusCode.INTERNAL,
        3: grpc.StatusCode.INVALID_ARGUMENT,
    }
    for i, error in enumerate(bad_results):
        assert isinstance(error, InferenceServerException), error
        assert error.status() == str(expected_status[i % 4]), error


def test_server_still_live_and_serving_after_all_bad_requests(
    server: ServerProcess, client: grpcclient.InferenceServerClient
) -> None:
    assert server.proc.poll() is None
    assert client.is_server_live() is True
    assert client.is_server_ready() is True
    _assert_tabular_works(client)
    echo = client.infer(
        "text_echo", [_input("text", np.array([["still ok"]], dtype=object), "BYTES")]
    )
    assert echo.as_numpy("text_out")[0, 0] == b"still ok"
