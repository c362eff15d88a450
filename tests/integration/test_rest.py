"""KServe v2 REST (Triton's HTTP API) against a real `sluice serve`.

tritonclient.http (sync and aio) drives what it can build; plain urllib sends
what it cannot (bad JSON, nested data, a lying Inference-Header-Content-Length)
and reads the raw status codes. Expected values come from onnxruntime run
in-process on the model files the server serves, or are the inputs themselves
(identity models).

The module server holds the example tabular_classifier and text_echo, the
all-datatypes identity graph, a model whose queue holds one request
(mlp_small_queue: 429 when full) and ``broken`` (never loads: 503). It runs in
explicit control mode with every model loaded at start, so load and unload are
tested on it too, and with a 1 MiB message limit so the body bound is testable.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import threading
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx_models
import onnxruntime as ort
import pytest
import tritonclient.http as httpclient
import tritonclient.http.aio as aiohttpclient
from conftest import ServerProcess, wait_until
from onnx import TensorProto, helper
from test_datatypes import SUFFIXES, WIRE
from test_errors import BROKEN_CONFIG
from tritonclient.utils import InferenceServerException

EXAMPLE_MODELS = Path(__file__).resolve().parents[2] / "python" / "sluice" / "examples" / "models"
MAX_MESSAGE_BYTES = 1 << 20


SMALL_QUEUE_CONFIG = """\
max_batch_size: 4
input [ { name: "x" data_type: TYPE_FP32 dims: [ 16 ] } ]
output [ { name: "y" data_type: TYPE_FP32 dims: [ 4 ] } ]
dynamic_batching {
  max_queue_delay_microseconds: 1000000
  default_queue_policy { max_queue_size: 1 }
}
"""


def _mlp(path: Path) -> None:
    w = helper.make_tensor(
        "w", TensorProto.FLOAT, [16, 4], np.linspace(-1, 1, 64, dtype=np.float32).tolist()
    )
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
        initializer=[w],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = onnx_models.IR_VERSION
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(model.SerializeToString())


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = tmp_path_factory.mktemp("rest_repo")
    for model in ("tabular_classifier", "text_echo"):
        shutil.copytree(EXAMPLE_MODELS / model, repo / model)
    onnx_models.build_all_dtypes_identity(repo / "all_dtypes" / "1" / "model.onnx")
    _mlp(repo / "mlp_small_queue" / "1" / "model.onnx")
    (repo / "mlp_small_queue" / "config.pbtxt").write_text(SMALL_QUEUE_CONFIG)
    onnx_models.build_add_sub(repo / "broken" / "1" / "model.onnx")
    (repo / "broken" / "config.pbtxt").write_text(BROKEN_CONFIG)
    return repo


@pytest.fixture(scope="module")
def server(repository: Path, executor: str) -> Iterator[ServerProcess]:
    s = ServerProcess(
        repository,
        [
            "--model-control-mode",
            "explicit",
            "--load-model",
            "*",
            "--grpc-max-message-bytes",
            str(MAX_MESSAGE_BYTES),
        ],
        executor=executor,
    )
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> Iterator[httpclient.InferenceServerClient]:
    c = httpclient.InferenceServerClient(f"127.0.0.1:{server.http_port}")
    yield c
    c.close()


def _session(repository: Path, model: str) -> ort.InferenceSession:
    return ort.InferenceSession(
        str(repository / model / "1" / "model.onnx"), providers=["CPUExecutionProvider"]
    )


def _input(name: str, data: np.ndarray[Any, Any], datatype: str, binary: bool) -> Any:
    inp = httpclient.InferInput(name, list(data.shape), datatype)
    inp.set_data_from_numpy(data, binary_data=binary)
    return inp


def _features(rows: int, seed: int = 0) -> np.ndarray[Any, Any]:
    return np.random.default_rng(seed).standard_normal((rows, 8)).astype(np.float32)


def _http(
    server: ServerProcess,
    path: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
    method: str | None = None,
) -> tuple[int, dict[str, str], bytes]:
    """(status, headers, body) of one plain HTTP request; errors are returned too."""
    request = urllib.request.Request(
        f"http://127.0.0.1:{server.http_port}{path}",
        data=body,
        headers=headers or {},
        method=method or ("POST" if body is not None else "GET"),
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as reply:
            return reply.status, dict(reply.headers), reply.read()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, dict(exc.headers), exc.read()


def _error(server: ServerProcess, path: str, body: Any, status: int, *fragments: str) -> str:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    code, _, text = _http(server, path, data)
    assert code == status, text
    message = json.loads(text)["error"]
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    return str(message)


def _client_error(call: Callable[[], object], status: int, *fragments: str) -> str:
    with pytest.raises(InferenceServerException) as info:
        call()
    assert info.value.status() == str(status), info.value
    message = info.value.message() or ""
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    return message


# ---- health and metadata --------------------------------------------------------------


def test_health_and_server_metadata(client: httpclient.InferenceServerClient) -> None:
    assert client.is_server_live()
    # Strict readiness (the default): 'broken' should load and has not.
    assert not client.is_server_ready()
    meta = client.get_server_metadata()
    assert meta["name"] == "sluice"
    assert "model_repository" in meta["extensions"]
    assert "statistics" in meta["extensions"]


def test_model_ready(client: httpclient.InferenceServerClient) -> None:
    assert client.is_model_ready("tabular_classifier")
    assert client.is_model_ready("tabular_classifier", "1")
    assert not client.is_model_ready("tabular_classifier", "7")
    assert not client.is_model_ready("broken")
    assert not client.is_model_ready("no_such_model")


def test_model_metadata_and_config(client: httpclient.InferenceServerClient) -> None:
    for version in ("", "1"):
        meta = client.get_model_metadata("tabular_classifier", version)
        assert meta["name"] == "tabular_classifier"
        assert meta["versions"] == ["1"]
        assert meta["platform"] == "onnxruntime_onnx"
        assert meta["inputs"] == [{"name": "features", "datatype": "FP32", "shape": [-1, 8]}]
        assert [(o["name"], o["datatype"], o["shape"]) for o in meta["outputs"]] == [
            ("probabilities", "FP32", [-1, 3]),
            ("label", "INT64", [-1, 1]),
        ]
    config = client.get_model_config("tabular_classifier")
    assert config["max_batch_size"] == 64
    # 64-bit integers are JSON numbers, as Triton writes them (perf_analyzer relies on it).
    assert config["input"][0]["dims"] == [8]
    assert config["dynamic_batching"]["max_queue_delay_microseconds"] == 500


def test_unknown_model_is_404(
    server: ServerProcess, client: httpclient.InferenceServerClient
) -> None:
    _client_error(lambda: client.get_model_metadata("no_such_model"), 404, "no_such_model")
    _client_error(lambda: client.get_model_config("no_such_model"), 404, "no_such_model")
    x = _input("features", _features(1), "FP32", True)
    _client_error(lambda: client.infer("no_such_model", [x]), 404, "no_such_model")
    _client_error(
        lambda: client.infer("tabular_classifier", [x], model_version="9"), 404, "tabular"
    )
    code, _, body = _http(server, "/v2/nothing/here")
    assert code == 404
    assert "error" in json.loads(body)


# ---- inference ----------------------------------------------------------------------------


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_infer_matches_onnxruntime(
    client: httpclient.InferenceServerClient, repository: Path, binary: bool
) -> None:
    x = _features(5, seed=3)
    outputs = [
        httpclient.InferRequestedOutput("probabilities", binary_data=binary),
        httpclient.InferRequestedOutput("label", binary_data=binary),
    ]
    result = client.infer(
        "tabular_classifier",
        [_input("features", x, "FP32", binary)],
        outputs=outputs,
        request_id="req-7",
    )
    response = result.get_response()
    assert response["id"] == "req-7"
    assert response["model_name"] == "tabular_classifier"
    assert response["model_version"] == "1"
    for out in response["outputs"]:
        assert ("data" in out) is not binary
    expected = dict(
        zip(
            ["probabilities", "label"],
            _session(repository, "tabular_classifier").run(None, {"features": x}),
            strict=True,
        )
    )
    np.testing.assert_allclose(
        result.as_numpy("probabilities"), expected["probabilities"], rtol=1e-5, atol=1e-6
    )
    np.testing.assert_array_equal(result.as_numpy("label"), expected["label"])


def test_outputs_default_to_all_in_the_requested_form(
    client: httpclient.InferenceServerClient,
) -> None:
    x = _input("features", _features(2), "FP32", True)
    result = client.infer("tabular_classifier", [x])  # binary_data_output: true
    outs = result.get_response()["outputs"]
    assert [o["name"] for o in outs] == ["probabilities", "label"]
    assert all(o["parameters"]["binary_data_size"] > 0 for o in outs)
    only = client.infer(
        "tabular_classifier", [x], outputs=[httpclient.InferRequestedOutput("label", False)]
    )
    assert [o["name"] for o in only.get_response()["outputs"]] == ["label"]
    assert only.as_numpy("label").shape == (2, 1)


def _edge_values(suffix: str) -> np.ndarray[Any, Any]:
    dtype = np.dtype(WIRE[suffix][1])
    if suffix == "bool":
        values: list[Any] = [True, False, False, True]
    elif suffix == "string":
        values = ["", "héllo", "日本語 🚀", "plain"]
    elif dtype.kind in "ui":
        info = np.iinfo(dtype)
        values = [int(info.min), int(info.max), 1, int(info.max) - 1]
    else:  # finite values only: JSON has no inf or NaN
        finfo = np.finfo(dtype)
        values = [float(finfo.max), float(finfo.min), -0.0, float(finfo.smallest_subnormal)]
    return np.array(values, dtype=dtype).reshape(2, 2)


def _assert_same(got: np.ndarray[Any, Any], want: np.ndarray[Any, Any]) -> None:
    assert got.shape == want.shape
    if want.dtype == np.object_:
        text = [v.decode("utf-8") if isinstance(v, bytes) else v for v in got.reshape(-1)]
        assert text == list(want.reshape(-1))
        return
    assert got.dtype == want.dtype
    if want.dtype.kind == "f":  # bit for bit, so -0.0 counts
        bits = f"u{want.dtype.itemsize}"
        np.testing.assert_array_equal(got.view(bits), want.view(bits))
    else:
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_every_datatype_round_trips(client: httpclient.InferenceServerClient, binary: bool) -> None:
    data = {t: _edge_values(t) for t in SUFFIXES}
    inputs = [_input(f"in_{t}", arr, WIRE[t][0], binary) for t, arr in data.items()]
    outputs = [httpclient.InferRequestedOutput(f"out_{t}", binary_data=binary) for t in SUFFIXES]
    result = client.infer("all_dtypes", inputs, outputs=outputs)
    assert {o["name"]: o["datatype"] for o in result.get_response()["outputs"]} == {
        f"out_{t}": WIRE[t][0] for t in SUFFIXES
    }
    for t, want in data.items():
        _assert_same(result.as_numpy(f"out_{t}"), want)


def test_binary_fp16_inf_and_nan_round_trip(client: httpclient.InferenceServerClient) -> None:
    data = {t: np.zeros((1, 2), WIRE[t][1]) for t in SUFFIXES if t != "string"}
    data["string"] = np.array([["a", "b"]], dtype=object)
    data["float16"] = np.array([[np.inf, np.nan]], dtype=np.float16)
    inputs = [_input(f"in_{t}", arr, WIRE[t][0], True) for t, arr in data.items()]
    result = client.infer(
        "all_dtypes", inputs, outputs=[httpclient.InferRequestedOutput("out_float16")]
    )
    _assert_same(result.as_numpy("out_float16"), data["float16"])


def test_bytes_text_echo(client: httpclient.InferenceServerClient) -> None:
    for binary in (True, False):
        texts = np.array([["héllo"], [""], ["🚀 x"]], dtype=object)
        result = client.infer(
            "text_echo",
            [_input("text", texts, "BYTES", binary)],
            outputs=[httpclient.InferRequestedOutput("text_out", binary_data=binary)],
        )
        out = result.as_numpy("text_out")
        assert out.shape == (3, 1)


def test_nested_json_data_is_row_major(server: ServerProcess, repository: Path) -> None:
    x = _features(2, seed=5)
    body = {
        "inputs": [{"name": "features", "shape": [2, 8], "datatype": "FP32", "data": x.tolist()}],
        "outputs": [{"name": "probabilities"}],
    }
    code, headers, text = _http(
        server, "/v2/models/tabular_classifier/infer", json.dumps(body).encode()
    )
    assert code == 200, text
    assert headers["Content-Type"].startswith("application/json")
    reply = json.loads(text)
    (out,) = reply["outputs"]
    assert out["shape"] == [2, 3]
    expected = _session(repository, "tabular_classifier").run(["probabilities"], {"features": x})[0]
    np.testing.assert_allclose(
        np.array(out["data"], np.float32).reshape(2, 3), expected, rtol=1e-5, atol=1e-6
    )


def test_aio_client_concurrent_infers(server: ServerProcess) -> None:
    async def run() -> list[np.ndarray[Any, Any]]:
        c = aiohttpclient.InferenceServerClient(f"127.0.0.1:{server.http_port}")
        try:
            assert await c.is_server_live()
            assert await c.is_model_ready("tabular_classifier")

            async def one(i: int) -> np.ndarray[Any, Any]:
                inp = aiohttpclient.InferInput("features", [1, 8], "FP32")
                inp.set_data_from_numpy(_features(1, seed=i))
                result = await c.infer("tabular_classifier", [inp])
                out = result.as_numpy("probabilities")
                assert out is not None
                return out

            return list(await asyncio.gather(*(one(i) for i in range(16))))
        finally:
            await c.close()

    outs = asyncio.run(run())
    for out in outs:
        np.testing.assert_allclose(out.sum(axis=1), 1.0, rtol=1e-5)


# ---- errors -----------------------------------------------------------------------------


def test_request_errors_are_400_with_a_reason(
    server: ServerProcess, client: httpclient.InferenceServerClient
) -> None:
    _client_error(
        lambda: client.infer(
            "tabular_classifier", [_input("features", np.zeros((1, 8), np.float64), "FP64", True)]
        ),
        400,
        "data-type is 'FP64'",
    )
    _client_error(
        lambda: client.infer(
            "tabular_classifier", [_input("features", np.zeros((1, 7), np.float32), "FP32", False)]
        ),
        400,
        "unexpected shape",
    )
    _client_error(
        lambda: client.infer(
            "tabular_classifier", [_input("features", np.zeros((65, 8), np.float32), "FP32", True)]
        ),
        400,
        "batch-size",
    )
    path = "/v2/models/tabular_classifier/infer"
    _error(server, path, b"{not json", 400, "cannot be parsed")
    _error(server, path, [1, 2], 400, "JSON object")
    _error(
        server,
        path,
        {"inputs": [{"name": "features", "shape": [1, 8], "datatype": "FP32", "data": [1, 2]}]},
        400,
        "2 elements",
    )
    _error(
        server,
        path,
        {"inputs": [{"name": "features", "shape": [1, 8], "datatype": "FP32", "data": ["a"] * 8}]},
        400,
        "not valid FP32",
    )
    _error(
        server,
        path,
        {"inputs": [{"name": "features", "shape": [1, 8], "datatype": "NOPE", "data": [0] * 8}]},
        400,
        "unknown datatype",
    )
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "features",
                    "shape": [1, 8],
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": 32},
                }
            ]
        }
    ).encode()
    length = {"Inference-Header-Content-Length": str(len(header))}
    code, _, text = _http(server, path, header + b"\0" * 16, length)
    assert code == 400
    assert "runs past the end" in json.loads(text)["error"]
    code, _, text = _http(server, path, header + b"\0" * 40, length)
    assert code == 400
    assert "8 bytes of binary data" in json.loads(text)["error"]
    code, _, text = _http(
        server, path, header + b"\0" * 32, {"Inference-Header-Content-Length": "-3"}
    )
    assert code == 400
    code, _, text = _http(server, path, header + b"\0" * 32, length)
    assert code == 200, text


def test_body_over_the_message_limit_is_413(server: ServerProcess) -> None:
    body = b"{" + b" " * MAX_MESSAGE_BYTES + b"}"
    code, _, text = _http(server, "/v2/models/tabular_classifier/infer", body)
    assert code == 413
    assert "error" in json.loads(text)


def test_model_not_ready_is_503(client: httpclient.InferenceServerClient) -> None:
    a = np.zeros((1, 16), np.int32)
    message = _client_error(
        lambda: client.infer(
            "broken", [_input("INPUT0", a, "INT32", True), _input("INPUT1", a, "INT32", True)]
        ),
        503,
        "'broken'",
    )
    assert "not ready" in message


def _pending(server: ServerProcess, model: str) -> float:
    _, _, text = _http(server, "/metrics")
    for line in text.decode().splitlines():
        if line.startswith("nv_inference_pending_request_count{") and f'model="{model}"' in line:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_queue_full_is_429(server: ServerProcess, client: httpclient.InferenceServerClient) -> None:
    x = np.zeros((1, 16), np.float32)
    outcome: list[Any] = []

    def first() -> None:
        c = httpclient.InferenceServerClient(f"127.0.0.1:{server.http_port}")
        try:
            outcome.append(c.infer("mlp_small_queue", [_input("x", x, "FP32", True)]))
        finally:
            c.close()

    t = threading.Thread(target=first)
    t.start()
    # The first request waits out its 1 s queue delay, filling the queue of one.
    wait_until("the first request to queue", lambda: _pending(server, "mlp_small_queue") == 1, 10)
    _client_error(
        lambda: client.infer("mlp_small_queue", [_input("x", x, "FP32", True)]),
        429,
        "exceeds maximum queue size",
    )
    t.join(10)
    assert outcome, "the queued request got no answer"
    assert outcome[0].as_numpy("y").shape == (1, 4)


# ---- statistics and repository -------------------------------------------------------------


def test_statistics_count_successes(client: httpclient.InferenceServerClient) -> None:
    def success() -> tuple[int, int]:
        (s,) = client.get_inference_statistics("text_echo")["model_stats"]
        return s["inference_stats"]["success"]["count"], s["inference_count"]

    before = success()
    texts = np.array([["a"], ["b"]], dtype=object)
    for _ in range(3):
        client.infer("text_echo", [_input("text", texts, "BYTES", True)])
    after = success()
    assert (after[0] - before[0], after[1] - before[1]) == (3, 6)
    everything = client.get_inference_statistics()["model_stats"]
    assert {"text_echo", "tabular_classifier"} <= {s["name"] for s in everything}
    _client_error(lambda: client.get_inference_statistics("no_such_model"), 404)


def test_repository_index_load_and_unload(client: httpclient.InferenceServerClient) -> None:
    index = {(e["name"], e.get("version", "")): e for e in client.get_model_repository_index()}
    assert index[("tabular_classifier", "1")]["state"] == "READY"
    assert index[("broken", "1")]["state"] == "UNAVAILABLE"
    assert "TYPE_FP32 in the config but TYPE_INT32" in index[("broken", "1")]["reason"]
    client.unload_model("mlp_small_queue")
    assert not client.is_model_ready("mlp_small_queue")
    override = {
        "max_batch_size": 2,
        "input": [{"name": "x", "data_type": "TYPE_FP32", "dims": [16]}],
        "output": [{"name": "y", "data_type": "TYPE_FP32", "dims": [4]}],
    }
    client.load_model("mlp_small_queue", config=json.dumps(override))
    assert client.is_model_ready("mlp_small_queue")
    assert client.get_model_config("mlp_small_queue")["max_batch_size"] == 2
    _client_error(
        lambda: client.load_model("mlp_small_queue", config="{not json"),
        400,
        "not a valid JSON ModelConfig",
    )
    # An override the model cannot load with is an error, and the loaded one keeps serving.
    rejected = dict(override, input=[{"name": "x", "data_type": "TYPE_INT32", "dims": [16]}])
    _client_error(
        lambda: client.load_model("mlp_small_queue", config=json.dumps(rejected)),
        503,
        "failed to load 'mlp_small_queue'",
        "keep serving",
    )
    assert client.get_model_config("mlp_small_queue")["max_batch_size"] == 2
    x = _input("x", np.zeros((1, 16), np.float32), "FP32", True)
    assert client.infer("mlp_small_queue", [x]).as_numpy("y").shape == (1, 4)
    client.load_model("mlp_small_queue")  # back to its own config file
    assert client.get_model_config("mlp_small_queue")["max_batch_size"] == 4
    _client_error(lambda: client.load_model("../etc"), 404)


def test_load_outside_explicit_mode_is_503(example_server: ServerProcess) -> None:
    c = httpclient.InferenceServerClient(f"127.0.0.1:{example_server.http_port}")
    try:
        _client_error(lambda: c.unload_model("tabular_classifier"), 503, "explicit")
        assert c.is_model_ready("tabular_classifier")
    finally:
        c.close()


# ---- sluice's own operations and /metrics ------------------------------------------------------


def test_drift_feedback_and_rollout(server: ServerProcess) -> None:
    code, _, text = _http(server, "/v2/models/tabular_classifier/drift")
    assert code == 200, text
    report = json.loads(text)
    assert report["model_name"] == "tabular_classifier"
    assert report["version"] == 1
    code, _, text = _http(
        server,
        "/v2/models/tabular_classifier/feedback",
        json.dumps({"labels": [{"request_id": "never-sent", "values": [1.0]}]}).encode(),
    )
    assert code == 200, text
    assert json.loads(text)["unknown"] == 1
    code, _, text = _http(server, "/v2/models/tabular_classifier/rollout")
    assert code == 200, text
    assert json.loads(text)["model_name"] == "tabular_classifier"
    _error(
        server,
        "/v2/models/tabular_classifier/rollout",
        {"canary": {"version": 1, "weight": 7.0}},
        400,
        "rollout",
    )
    code, _, _ = _http(server, "/v2/models/no_such_model/drift")
    assert code == 404


def test_metrics_on_the_http_port(server: ServerProcess) -> None:
    code, headers, text = _http(server, "/metrics")
    assert code == 200
    assert headers["Content-Type"].startswith("text/plain")
    assert b"nv_inference_count" in text


# ---- perf_analyzer ---------------------------------------------------------------------------


def _perf_analyzer() -> Path:
    venv = Path(os.environ.get("PERF_ANALYZER_VENV", "benchmarks/.venv-perf"))
    if not venv.is_absolute():
        venv = Path(__file__).resolve().parents[2] / venv
    return venv / "bin" / "pa"


def _fail_and_success(port: int, model: str) -> tuple[int, int]:
    c = httpclient.InferenceServerClient(f"127.0.0.1:{port}")
    try:
        (s,) = c.get_inference_statistics(model)["model_stats"]
    finally:
        c.close()
    return s["inference_stats"]["fail"]["count"], s["inference_stats"]["success"]["count"]


@pytest.mark.parametrize("tensor_format", ["binary", "json"])
def test_perf_analyzer_http_completes_without_errors(
    example_server: ServerProcess, tensor_format: str
) -> None:
    pa = _perf_analyzer()
    if not pa.is_file():
        pytest.skip(
            f"perf_analyzer is not installed ({pa}): run benchmarks/install_perf_analyzer.sh"
        )
    port = example_server.http_port
    failed_before, ok_before = _fail_and_success(port, "tabular_classifier")
    run = subprocess.run(
        [
            str(pa),
            "-i",
            "http",
            "-u",
            f"127.0.0.1:{port}",
            "-m",
            "tabular_classifier",
            "--concurrency-range",
            "4:4",
            "--measurement-interval",
            "1000",
            "-r",
            "10",
            f"--input-tensor-format={tensor_format}",
            f"--output-tensor-format={tensor_format}",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    output = run.stdout + run.stderr
    # perf_analyzer exits 2 when a busy machine keeps its windows from agreeing;
    # that says nothing about the server's answers, which are checked below.
    unstable = run.returncode == 2 and "Failed to obtain stable measurement" in output
    assert run.returncode == 0 or unstable, output
    failed_after, ok_after = _fail_and_success(port, "tabular_classifier")
    assert failed_after == failed_before, output
    assert ok_after - ok_before > 100, output
    errors = [
        line
        for line in output.splitlines()
        if "error" in line.lower() and "stable measurement" not in line
    ]
    assert not errors, output


# ---- graceful stop ---------------------------------------------------------------------------


def test_sigterm_answers_the_rest_request_in_flight(
    repository: Path, start_server: Callable[..., ServerProcess]
) -> None:
    server = start_server(repository, "--strict-readiness", "false")
    x = np.ones((1, 16), np.float32)
    outcome: list[Any] = []

    def in_flight() -> None:
        c = httpclient.InferenceServerClient(f"127.0.0.1:{server.http_port}")
        try:
            outcome.append(c.infer("mlp_small_queue", [_input("x", x, "FP32", True)]))
        except Exception as exc:
            outcome.append(exc)
        finally:
            c.close()

    t = threading.Thread(target=in_flight)
    t.start()
    # It waits out the model's 1 s queue delay; stop the server meanwhile.
    wait_until("the request to queue", lambda: _pending(server, "mlp_small_queue") == 1, 10)
    server.proc.send_signal(signal.SIGTERM)
    t.join(30)
    assert server.proc.wait(timeout=60) == 0, server.log[-3000:]
    assert len(outcome) == 1
    assert not isinstance(outcome[0], Exception), outcome[0]
    assert outcome[0].as_numpy("y").shape == (1, 4)
    with pytest.raises(urllib.error.URLError, match="refused"):  # the port is closed
        urllib.request.urlopen(f"http://127.0.0.1:{server.http_port}/v2/health/live", timeout=5)


def test_undecodable_requests_count_as_failures(
    server: ServerProcess, client: httpclient.InferenceServerClient
) -> None:
    def failures() -> int:
        (s,) = client.get_inference_statistics("tabular_classifier")["model_stats"]
        return int(s["inference_stats"]["fail"]["count"])

    before = failures()
    bad = {"inputs": [{"name": "features", "shape": [1, 8], "datatype": "FP32", "data": [1]}]}
    _error(server, "/v2/models/tabular_classifier/infer", bad, 400, "1 elements")
    assert failures() == before + 1
