"""Request bounds and client data in messages, against a real `sluice serve`
(issue 15, items 4 and 5): --max-inflight-per-model counts a model's versions
together, and nothing a client names comes back raw in an error."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tc
from conftest import ServerProcess
from onnx_models import build_scaler
from tritonclient.utils import InferenceServerException

# Requests wait in the batcher up to the queue delay for a fuller batch: they
# stay in flight, accepted and unanswered, that long.
HELD_CONFIG = """max_batch_size: 8
input [ { name: "x" data_type: TYPE_FP32 dims: [ 4 ] } ]
output [ { name: "y" data_type: TYPE_FP32 dims: [ 4 ] } ]
version_policy { all { } }
dynamic_batching { max_queue_delay_microseconds: 4000000 }
"""


def test_max_inflight_counts_every_version_of_a_model_together(
    tmp_path: Path, start_server: Callable[..., ServerProcess]
) -> None:
    repo = tmp_path / "repo"
    build_scaler(repo / "m" / "1" / "model.onnx", 1.0)
    build_scaler(repo / "m" / "2" / "model.onnx", 2.0)
    (repo / "m" / "config.pbtxt").write_text(HELD_CONFIG)
    server = start_server(repo, "--max-inflight-per-model", "4")
    client = tc.InferenceServerClient(server.url)
    assert client.is_model_ready("m", "1")
    assert client.is_model_ready("m", "2")

    def infer(i: int) -> tuple[str, object]:
        version = "1" if i % 2 else "2"
        x = tc.InferInput("x", [1, 4], "FP32")
        x.set_data_from_numpy(np.full((1, 4), i, np.float32))
        try:
            y = client.infer("m", [x], model_version=version, client_timeout=60).as_numpy("y")
        except InferenceServerException as exc:
            return version, exc
        return version, y

    # Six requests, three per version, inside one queue delay: with a limit of 4
    # per version all six would be accepted; per model, two are refused.
    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(infer, range(6)))
    refused = [r for _, r in results if isinstance(r, InferenceServerException)]
    assert len(refused) == 2, [str(r) for _, r in results]
    for exc in refused:
        assert exc.status() == "StatusCode.RESOURCE_EXHAUSTED"
        assert "--max-inflight-per-model" in str(exc.message())
    # Every accepted request is answered, by the version it asked for.
    for i, (version, y) in enumerate(results):
        if isinstance(y, InferenceServerException):
            continue
        assert isinstance(y, np.ndarray)
        assert y.tolist() == [[i * (1.0 if version == "1" else 2.0)] * 4]
    stats = client.get_inference_statistics("m", as_json=True)["model_stats"]
    assert sum(int(s["inference_stats"]["success"]["count"]) for s in stats) == 4
    # Once answered, they no longer count.
    assert all(not isinstance(r, Exception) for _, r in [infer(1), infer(2)])


# ---- item 5: client data in error messages ------------------------------------------

HOSTILE = "evil\nname\x00\x1b[31m\u202e" + "x" * 5000

PLAIN_CONFIG = """max_batch_size: 8
input [ { name: "x" data_type: TYPE_FP32 dims: [ 4 ] } ]
output [ { name: "y" data_type: TYPE_FP32 dims: [ 4 ] } ]
"""


def _clean(message: str) -> None:
    """One printable line, bounded: no raw client data."""
    assert message.isprintable(), repr(message[:300])
    assert len(message) < 1024, len(message)
    assert "x" * 200 not in message


def test_client_names_never_come_back_raw_in_errors(
    tmp_path: Path, start_server: Callable[..., ServerProcess]
) -> None:
    from sluice.proto import grpc_service_pb2 as pb
    from sluice.proto import grpc_service_pb2_grpc as pb_grpc

    repo = tmp_path / "repo"
    build_scaler(repo / "m" / "1" / "model.onnx", 1.0)
    (repo / "m" / "config.pbtxt").write_text(PLAIN_CONFIG)
    server = start_server(repo, "--model-control-mode", "explicit", "--load-model", "m")
    x = np.zeros((1, 4), np.float32).tobytes()

    def request(**fields: object) -> pb.ModelInferRequest:
        msg = pb.ModelInferRequest(model_name="m")
        t = msg.inputs.add(name="x", datatype="FP32", shape=[1, 4])
        msg.raw_input_contents.append(x)
        for key, value in fields.items():
            if key == "input_name":
                t.name = str(value)
            elif key == "datatype":
                t.datatype = str(value)
            elif key == "output":
                msg.outputs.add(name=str(value))
            else:
                setattr(msg, key, value)
        return msg

    calls: list[tuple[str, Callable[[object], object], object]] = []
    with grpc.insecure_channel(server.url) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        calls = [
            ("unknown model", stub.ModelInfer, request(model_name=HOSTILE)),
            ("unknown version", stub.ModelInfer, request(model_version=HOSTILE)),
            ("unknown input", stub.ModelInfer, request(input_name=HOSTILE)),
            ("unknown datatype", stub.ModelInfer, request(datatype=HOSTILE)),
            ("unknown output", stub.ModelInfer, request(output=HOSTILE)),
            ("metadata", stub.ModelMetadata, pb.ModelMetadataRequest(name=HOSTILE)),
            ("config", stub.ModelConfig, pb.ModelConfigRequest(name=HOSTILE)),
            ("load", stub.RepositoryModelLoad, pb.RepositoryModelLoadRequest(model_name=HOSTILE)),
            (
                "config override",
                stub.RepositoryModelLoad,
                pb.RepositoryModelLoadRequest(
                    model_name="m",
                    parameters={
                        "config": pb.ModelRepositoryParameter(string_param=json.dumps({HOSTILE: 1}))
                    },
                ),
            ),
        ]
        for what, call, message in calls:
            with pytest.raises(grpc.RpcError) as err:
                call(message, timeout=30)
            assert err.value.code() is not grpc.StatusCode.UNKNOWN, what
            _clean(err.value.details() or "")
        # A stream answers in-band, under the same rule.
        replies = list(stub.ModelStreamInfer(iter([request(model_name=HOSTILE)]), timeout=30))
        assert replies[0].error_message
        _clean(replies[0].error_message)
    # REST: the model name in the path, tensor names in the JSON body.
    quoted = urllib.request.quote(HOSTILE, safe="")
    bodies = [
        (f"/v2/models/{quoted}/infer", {"inputs": []}),
        (
            "/v2/models/m/infer",
            {"inputs": [{"name": HOSTILE, "datatype": "FP32", "shape": [1, 4], "data": [0] * 4}]},
        ),
        (
            "/v2/models/m/infer",
            {"inputs": [{"name": "x", "datatype": HOSTILE, "shape": [1, 4], "data": [0] * 4}]},
        ),
    ]
    for path, body in bodies:
        req = urllib.request.Request(
            f"http://127.0.0.1:{server.http_port}{path}",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        with pytest.raises(urllib.error.HTTPError) as http_err:
            urllib.request.urlopen(req, timeout=30)
        with http_err.value as response:
            assert 400 <= response.code < 500
            _clean(json.loads(response.read())["error"])
