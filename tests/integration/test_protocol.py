"""KServe v2 / Triton gRPC protocol conformance against the bundled example repository.

Everything goes through real clients: tritonclient.grpc (sync and aio), grpc_health,
grpc_reflection, and -- for requests tritonclient cannot build or responses it does
not expose -- tritonclient's own generated protos over a plain grpc channel.
Expected values come from onnxruntime run in-process on the very model files the
server serves (the path printed in its ready banner).
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import json
import queue
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as aioclient
from conftest import ServerProcess
from google.protobuf import descriptor_pool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

EXAMPLES = ("tabular_classifier", "image_classifier", "text_echo")
SERVICE = "inference.GRPCInferenceService"
# model -> (input name, per-row input shape)
FLOAT_MODELS: dict[str, tuple[str, tuple[int, ...]]] = {
    "tabular_classifier": ("features", (8,)),
    "image_classifier": ("image", (3, 32, 32)),
}

OrtRun = Callable[[str, dict[str, np.ndarray[Any, Any]]], dict[str, np.ndarray[Any, Any]]]


def repository_of(server: ServerProcess) -> Path:
    """The repository the server really serves, from its ready banner."""
    for line in server.stdout_lines:
        if line.startswith("model repository: "):
            return Path(line.removeprefix("model repository: ").strip())
    raise AssertionError(
        "no 'model repository:' line in the banner:\n" + "".join(server.stdout_lines)
    )


@pytest.fixture(scope="module")
def ort_run(example_server: ServerProcess) -> OrtRun:
    """Runs an example model in-process with onnxruntime; returns outputs by name."""
    repo = repository_of(example_server)
    sessions: dict[str, ort.InferenceSession] = {}

    def run(model: str, feeds: dict[str, np.ndarray[Any, Any]]) -> dict[str, np.ndarray[Any, Any]]:
        if model not in sessions:
            sessions[model] = ort.InferenceSession(
                str(repo / model / "1" / "model.onnx"), providers=["CPUExecutionProvider"]
            )
        session = sessions[model]
        names = [o.name for o in session.get_outputs()]
        return dict(zip(names, session.run(names, feeds), strict=True))

    return run


@pytest.fixture(scope="module")
def client(example_server: ServerProcess) -> Iterator[grpcclient.InferenceServerClient]:
    c = grpcclient.InferenceServerClient(example_server.url)
    yield c
    c.close()


@pytest.fixture(scope="module")
def stub(example_server: ServerProcess) -> Iterator[service_pb2_grpc.GRPCInferenceServiceStub]:
    with grpc.insecure_channel(example_server.url) as channel:
        yield service_pb2_grpc.GRPCInferenceServiceStub(channel)


def _features(rows: int, seed: int = 0, row_shape: tuple[int, ...] = (8,)) -> np.ndarray[Any, Any]:
    return np.random.default_rng(seed).standard_normal((rows, *row_shape)).astype(np.float32)


def _fp32_input(name: str, data: np.ndarray[Any, Any]) -> grpcclient.InferInput:
    inp = grpcclient.InferInput(name, list(data.shape), "FP32")
    inp.set_data_from_numpy(data)
    return inp


def _assert_tabular(
    outputs: dict[str, np.ndarray[Any, Any]], expected: dict[str, np.ndarray[Any, Any]]
) -> None:
    np.testing.assert_allclose(
        outputs["probabilities"], expected["probabilities"], rtol=1e-5, atol=1e-6
    )
    np.testing.assert_array_equal(outputs["label"], expected["label"])


# ---- health and metadata ---------------------------------------------------------


def test_server_live_and_ready(client: grpcclient.InferenceServerClient) -> None:
    assert client.is_server_live() is True
    assert client.is_server_ready() is True


@pytest.mark.parametrize("model", EXAMPLES)
def test_model_ready_for_each_example(client: grpcclient.InferenceServerClient, model: str) -> None:
    assert client.is_model_ready(model) is True
    assert client.is_model_ready(model, "1") is True


def test_model_ready_false_for_unknown_model_and_version(
    client: grpcclient.InferenceServerClient,
) -> None:
    assert client.is_model_ready("no_such_model") is False
    assert client.is_model_ready("tabular_classifier", "7") is False


def test_server_metadata(client: grpcclient.InferenceServerClient) -> None:
    meta = client.get_server_metadata()
    assert meta.name == "sluice"
    assert meta.version == importlib.metadata.version("sluice-serve")
    assert sorted(meta.extensions) == [
        "model_configuration",
        "model_repository",
        "schedule_policy",
        "statistics",
    ]


EXPECTED_METADATA: dict[
    str, tuple[list[tuple[str, str, list[int]]], list[tuple[str, str, list[int]]]]
] = {
    "tabular_classifier": (
        [("features", "FP32", [-1, 8])],
        [("probabilities", "FP32", [-1, 3]), ("label", "INT64", [-1, 1])],
    ),
    "image_classifier": (
        [("image", "FP32", [-1, 3, 32, 32])],
        [("probabilities", "FP32", [-1, 10])],
    ),
    "text_echo": ([("text", "BYTES", [-1, 1])], [("text_out", "BYTES", [-1, 1])]),
}


@pytest.mark.parametrize("model", EXAMPLES)
def test_model_metadata(client: grpcclient.InferenceServerClient, model: str) -> None:
    meta = client.get_model_metadata(model)
    assert meta.name == model
    assert list(meta.versions) == ["1"]
    assert meta.platform == "onnxruntime_onnx"
    inputs, outputs = EXPECTED_METADATA[model]
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == inputs
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.outputs] == outputs


def test_model_config_tabular_from_config_file(client: grpcclient.InferenceServerClient) -> None:
    config = client.get_model_config("tabular_classifier").config
    assert config.name == "tabular_classifier"
    assert config.platform == "onnxruntime_onnx"
    assert config.max_batch_size == 64
    assert [(t.name, t.data_type, list(t.dims)) for t in config.input] == [
        ("features", grpcclient.model_config_pb2.TYPE_FP32, [8])
    ]
    assert [(t.name, t.data_type, list(t.dims)) for t in config.output] == [
        ("probabilities", grpcclient.model_config_pb2.TYPE_FP32, [3]),
        ("label", grpcclient.model_config_pb2.TYPE_INT64, [1]),
    ]


def test_model_config_image_autocompleted(client: grpcclient.InferenceServerClient) -> None:
    config = client.get_model_config("image_classifier").config
    assert config.name == "image_classifier"
    assert config.platform == "onnxruntime_onnx"
    assert config.max_batch_size == 4
    assert [(t.name, t.data_type, list(t.dims)) for t in config.input] == [
        ("image", grpcclient.model_config_pb2.TYPE_FP32, [3, 32, 32])
    ]
    assert [(t.name, t.data_type, list(t.dims)) for t in config.output] == [
        ("probabilities", grpcclient.model_config_pb2.TYPE_FP32, [10])
    ]


# ---- ModelInfer --------------------------------------------------------------------


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("model", sorted(FLOAT_MODELS))
def test_infer_matches_onnxruntime(
    client: grpcclient.InferenceServerClient, ort_run: OrtRun, model: str, batch: int
) -> None:
    name, row_shape = FLOAT_MODELS[model]
    data = _features(batch, seed=batch, row_shape=row_shape)
    result = client.infer(model, [_fp32_input(name, data)])
    expected = ort_run(model, {name: data})
    response = result.get_response()
    assert response.model_name == model
    assert response.model_version == "1"
    assert sorted(o.name for o in response.outputs) == sorted(expected)
    for out_name, want in expected.items():
        got = result.as_numpy(out_name)
        assert got.dtype == want.dtype
        assert got.shape == want.shape
        if want.dtype.kind == "f":
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
        else:
            np.testing.assert_array_equal(got, want)


def test_requested_output_subset(client: grpcclient.InferenceServerClient, ort_run: OrtRun) -> None:
    data = _features(2, seed=11)
    result = client.infer(
        "tabular_classifier",
        [_fp32_input("features", data)],
        outputs=[grpcclient.InferRequestedOutput("label")],
    )
    assert [o.name for o in result.get_response().outputs] == ["label"]
    assert result.as_numpy("probabilities") is None
    np.testing.assert_array_equal(
        result.as_numpy("label"), ort_run("tabular_classifier", {"features": data})["label"]
    )


def test_request_id_echoed(client: grpcclient.InferenceServerClient) -> None:
    result = client.infer(
        "tabular_classifier", [_fp32_input("features", _features(1))], request_id="req-42/ü"
    )
    assert result.get_response().id == "req-42/ü"


def test_unknown_request_parameters_ignored(
    client: grpcclient.InferenceServerClient, ort_run: OrtRun
) -> None:
    data = _features(2, seed=5)
    result = client.infer(
        "tabular_classifier", [_fp32_input("features", data)], parameters={"foo": "bar", "n": 3}
    )
    _assert_tabular(
        {n: result.as_numpy(n) for n in ("probabilities", "label")},
        ort_run("tabular_classifier", {"features": data}),
    )


def test_typed_contents_request_gets_typed_response(
    stub: service_pb2_grpc.GRPCInferenceServiceStub, ort_run: OrtRun
) -> None:
    data = _features(2, seed=21)
    request = service_pb2.ModelInferRequest(model_name="tabular_classifier", id="typed-1")
    tensor = request.inputs.add(name="features", datatype="FP32", shape=[2, 8])
    tensor.contents.fp32_contents.extend(data.reshape(-1).tolist())
    response = stub.ModelInfer(request, timeout=30)
    assert response.id == "typed-1"
    assert len(response.raw_output_contents) == 0
    by_name = {o.name: o for o in response.outputs}
    assert list(by_name["probabilities"].shape) == [2, 3]
    assert list(by_name["label"].shape) == [2, 1]
    got: dict[str, np.ndarray[Any, Any]] = {
        "probabilities": np.array(
            by_name["probabilities"].contents.fp32_contents, np.float32
        ).reshape(2, 3),
        "label": np.array(by_name["label"].contents.int64_contents, np.int64).reshape(2, 1),
    }
    _assert_tabular(got, ort_run("tabular_classifier", {"features": data}))


def test_raw_request_gets_raw_response(
    stub: service_pb2_grpc.GRPCInferenceServiceStub, ort_run: OrtRun
) -> None:
    data = _features(3, seed=22)
    request = service_pb2.ModelInferRequest(model_name="tabular_classifier")
    request.inputs.add(name="features", datatype="FP32", shape=[3, 8])
    request.raw_input_contents.append(data.tobytes())
    response = stub.ModelInfer(request, timeout=30)
    assert [o.name for o in response.outputs] == ["probabilities", "label"]
    assert len(response.raw_output_contents) == 2
    assert all(not o.HasField("contents") for o in response.outputs)
    got: dict[str, np.ndarray[Any, Any]] = {
        "probabilities": np.frombuffer(response.raw_output_contents[0], np.float32).reshape(3, 3),
        "label": np.frombuffer(response.raw_output_contents[1], np.int64).reshape(3, 1),
    }
    _assert_tabular(got, ort_run("tabular_classifier", {"features": data}))


# ---- ModelStreamInfer ----------------------------------------------------------------


def _collect(
    q: queue.Queue[tuple[Any, InferenceServerException | None]],
    result: Any,
    error: InferenceServerException | None,
) -> None:
    q.put((result, error))


def test_stream_infer_with_a_bad_request_in_the_middle(
    example_server: ServerProcess, ort_run: OrtRun
) -> None:
    good = {f"s{i}": _features(i + 1, seed=100 + i) for i in (0, 1, 3, 4)}
    q: queue.Queue[tuple[Any, InferenceServerException | None]] = queue.Queue()
    client = grpcclient.InferenceServerClient(example_server.url)
    try:
        client.start_stream(callback=partial(_collect, q))
        for i in range(5):
            rid = f"s{i}"
            data = _features(1, seed=999, row_shape=(7,)) if i == 2 else good[rid]
            client.async_stream_infer(
                "tabular_classifier", [_fp32_input("features", data)], request_id=rid
            )
        replies = [q.get(timeout=30) for _ in range(5)]
    finally:
        client.stop_stream()
        client.close()
    errors = [e for r, e in replies if e is not None]
    results = {r.get_response().id: r for r, e in replies if e is None}
    assert sorted(results) == sorted(good)
    for rid, result in results.items():
        _assert_tabular(
            {n: result.as_numpy(n) for n in ("probabilities", "label")},
            ort_run("tabular_classifier", {"features": good[rid]}),
        )
    assert len(errors) == 1
    message = errors[0].message()
    assert "features" in message
    assert "tabular_classifier" in message
    assert "[1,7]" in message


def test_stream_error_response_carries_the_request_id(
    stub: service_pb2_grpc.GRPCInferenceServiceStub,
) -> None:
    # tritonclient's stream callback drops the id of an error reply; read it off the wire.
    def requests() -> Iterator[service_pb2.ModelInferRequest]:
        for i, cols in enumerate((8, 5, 8)):
            r = service_pb2.ModelInferRequest(model_name="tabular_classifier", id=f"w{i}")
            r.inputs.add(name="features", datatype="FP32", shape=[1, cols])
            r.raw_input_contents.append(_features(1, seed=i, row_shape=(cols,)).tobytes())
            yield r

    replies = list(stub.ModelStreamInfer(requests(), timeout=30))
    assert len(replies) == 3
    by_id = {r.infer_response.id: r for r in replies}
    assert sorted(by_id) == ["w0", "w1", "w2"]
    assert by_id["w0"].error_message == ""
    assert by_id["w2"].error_message == ""
    assert "unexpected shape for input 'features'" in by_id["w1"].error_message
    assert by_id["w1"].infer_response.model_name == "tabular_classifier"


# ---- aio client -------------------------------------------------------------------


def test_aio_client_32_concurrent_infers(example_server: ServerProcess, ort_run: OrtRun) -> None:
    batches = {i: _features(1 + i % 4, seed=200 + i) for i in range(32)}

    async def main() -> dict[int, dict[str, np.ndarray[Any, Any]]]:
        client = aioclient.InferenceServerClient(example_server.url)
        try:

            async def one(i: int) -> tuple[int, dict[str, np.ndarray[Any, Any]]]:
                inp = aioclient.InferInput("features", list(batches[i].shape), "FP32")
                inp.set_data_from_numpy(batches[i])
                result = await client.infer("tabular_classifier", [inp], request_id=str(i))
                assert result.get_response().id == str(i)
                return i, {n: result.as_numpy(n) for n in ("probabilities", "label")}

            return dict(await asyncio.gather(*(one(i) for i in range(32))))
        finally:
            await client.close()

    results = asyncio.run(main())
    assert sorted(results) == list(range(32))
    for i, outputs in results.items():
        _assert_tabular(outputs, ort_run("tabular_classifier", {"features": batches[i]}))


# ---- grpc.health.v1 and reflection ------------------------------------------------


@pytest.fixture(scope="module")
def health_stub(example_server: ServerProcess) -> Iterator[health_pb2_grpc.HealthStub]:
    with grpc.insecure_channel(example_server.url) as channel:
        yield health_pb2_grpc.HealthStub(channel)


@pytest.mark.parametrize("service", ["", SERVICE, *EXAMPLES])
def test_health_check_serving(health_stub: health_pb2_grpc.HealthStub, service: str) -> None:
    reply = health_stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_health_check_unknown_service_not_found(health_stub: health_pb2_grpc.HealthStub) -> None:
    with pytest.raises(grpc.RpcError) as info:
        health_stub.Check(health_pb2.HealthCheckRequest(service="no_such_model"), timeout=10)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


def test_reflection_lists_services(example_server: ServerProcess) -> None:
    with grpc.insecure_channel(example_server.url) as channel:
        db = ProtoReflectionDescriptorDatabase(channel)
        services = set(db.get_services())
        assert {
            SERVICE,
            "grpc.health.v1.Health",
            "grpc.reflection.v1alpha.ServerReflection",
        } <= services
        # A private pool: reflected descriptors must not touch the default pool,
        # where tritonclient's descriptors for the same package live.
        pool = descriptor_pool.DescriptorPool(db)
        methods = {m.name for m in pool.FindServiceByName(SERVICE).methods}
    assert {
        "ServerLive",
        "ServerReady",
        "ModelReady",
        "ServerMetadata",
        "ModelMetadata",
        "ModelConfig",
        "ModelStatistics",
        "ModelInfer",
        "ModelStreamInfer",
    } <= methods


# ---- ModelStatistics --------------------------------------------------------------


@pytest.fixture(scope="module")
def stats_server(executor: str) -> Iterator[ServerProcess]:
    """A fresh server whose counters only this module's statistics test touches."""
    server = ServerProcess(None, [], executor=executor)
    yield server
    server.stop()


def _stats(client: grpcclient.InferenceServerClient, model: str) -> Any:
    reply = client.get_inference_statistics(model)
    assert [(s.name, s.version) for s in reply.model_stats] == [(model, "1")]
    return reply.model_stats[0]


def test_statistics_count_successes_and_rows_exactly(stats_server: ServerProcess) -> None:
    client = grpcclient.InferenceServerClient(stats_server.url)
    try:
        before = _stats(client, "tabular_classifier")
        assert before.inference_stats.success.count == 0  # warm-up is not counted
        assert before.inference_count == 0
        batches = [1, 2, 3, 1, 4]
        for i, rows in enumerate(batches):
            client.infer("tabular_classifier", [_fp32_input("features", _features(rows, seed=i))])
        after = _stats(client, "tabular_classifier")
        assert after.inference_stats.success.count == before.inference_stats.success.count + len(
            batches
        )
        assert after.inference_count == before.inference_count + sum(batches)
        assert after.execution_count == before.execution_count + len(batches)
        assert after.inference_stats.success.ns > before.inference_stats.success.ns
        assert after.last_inference > 0
        assert after.inference_stats.fail.count == before.inference_stats.fail.count
        # A rejected request counts as a failure, never as a success or a row.
        with pytest.raises(InferenceServerException):
            client.infer(
                "tabular_classifier", [_fp32_input("features", _features(1, row_shape=(7,)))]
            )
        failed = _stats(client, "tabular_classifier")
        assert failed.inference_stats.fail.count == after.inference_stats.fail.count + 1
        assert failed.inference_stats.success.count == after.inference_stats.success.count
        assert failed.inference_count == after.inference_count
        # Other models are untouched.
        assert _stats(client, "image_classifier").inference_stats.success.count == 0
    finally:
        client.close()


# ---- BYTES ----------------------------------------------------------------------


def test_bytes_unicode_round_trip(
    client: grpcclient.InferenceServerClient, ort_run: OrtRun
) -> None:
    texts = ["héllo wörld", "日本語のテキスト", "emoji 🚀🧪", ""]
    data = np.array(texts, dtype=object).reshape(4, 1)
    inp = grpcclient.InferInput("text", [4, 1], "BYTES")
    inp.set_data_from_numpy(data)
    result = client.infer("text_echo", [inp])
    out = result.as_numpy("text_out")
    assert out.shape == (4, 1)
    assert [v.decode("utf-8") for v in out.reshape(-1)] == texts
    expected = ort_run("text_echo", {"text": data})["text_out"]
    assert [v.decode("utf-8") for v in out.reshape(-1)] == list(expected.reshape(-1))


# ---- sluice infer (CLI) -------------------------------------------------------------


def _cli_infer(url: str, *args: str) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, "-m", "sluice.cli", "infer", *args, "--url", url],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    parsed: dict[str, Any] = json.loads(proc.stdout)
    return parsed


def test_cli_infer_matches_onnxruntime(example_server: ServerProcess, ort_run: OrtRun) -> None:
    data = _features(1, seed=77)
    spec = "features=" + json.dumps(data.tolist())
    out = _cli_infer(example_server.url, "tabular_classifier", "--input", spec)
    assert out["model_name"] == "tabular_classifier"
    assert out["model_version"] == "1"
    # JSON carries float32 values as Python floats; the input round-trips exactly.
    expected = ort_run("tabular_classifier", {"features": data})
    probs = out["outputs"]["probabilities"]
    assert probs["datatype"] == "FP32"
    assert probs["shape"] == [1, 3]
    np.testing.assert_allclose(
        np.array(probs["data"], np.float32).reshape(1, 3), expected["probabilities"], rtol=1e-6
    )
    assert out["outputs"]["label"]["data"] == expected["label"].reshape(-1).tolist()


def test_cli_infer_random(example_server: ServerProcess) -> None:
    out = _cli_infer(example_server.url, "tabular_classifier", "--random")
    probs = out["outputs"]["probabilities"]
    assert probs["shape"] == [1, 3]
    assert sum(probs["data"]) == pytest.approx(1.0, abs=1e-5)
    assert out["outputs"]["label"]["data"] == [int(np.argmax(probs["data"]))]
    echo = _cli_infer(example_server.url, "text_echo", "--random")
    text_out = echo["outputs"]["text_out"]
    assert (text_out["datatype"], text_out["shape"]) == ("BYTES", [1, 1])
    # --random sends one short random lowercase word (datatypes.generated); echoed back.
    assert re.fullmatch("[a-z]{8}", text_out["data"][0])
