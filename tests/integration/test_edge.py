"""The one error edge: undecodable messages are INVALID_ARGUMENT with a one-line
reason (in-band, per message, on a stream that goes on), and nothing leaves as
UNKNOWN or fills the log with tracebacks."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tc
from conftest import ServerProcess
from sluice.proto import grpc_service_pb2 as pb
from tritonclient.utils import InferenceServerException

SERVICE = "/inference.GRPCInferenceService/"
GARBAGE = b"\xff\xff\xff\xff\x0f\x00garbage"  # not a protobuf message


def _raw_unary(url: str, method: str, payload: bytes) -> grpc.RpcError:
    with grpc.insecure_channel(url) as channel:
        call = channel.unary_unary(SERVICE + method)  # bytes in, bytes out
        with pytest.raises(grpc.RpcError) as info:
            call(payload, timeout=10)
    return info.value


@pytest.mark.parametrize("method", ["ModelInfer", "ModelMetadata", "RepositoryIndex"])
def test_undecodable_unary_requests_are_invalid_argument(
    example_server: ServerProcess, method: str
) -> None:
    for _ in range(50):
        error = _raw_unary(example_server.url, method, GARBAGE)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error
        details = error.details() or ""
        assert details.startswith("the request message cannot be decoded"), details
        assert "\n" not in details
    assert "Traceback" not in example_server.log


def test_an_undecodable_stream_message_is_answered_in_band_and_the_stream_goes_on(
    example_server: ServerProcess,
) -> None:
    good = pb.ModelInferRequest(model_name="tabular_classifier", id="good")
    good.inputs.add(name="features", datatype="FP32", shape=[1, 8])
    good.raw_input_contents.append(np.ones((1, 8), np.float32).tobytes())
    messages = [good.SerializeToString(), GARBAGE, good.SerializeToString()]
    with grpc.insecure_channel(example_server.url) as channel:
        stream = channel.stream_stream(SERVICE + "ModelStreamInfer")
        replies = [pb.ModelStreamInferResponse.FromString(r) for r in stream(iter(messages))]
    assert len(replies) == 3
    errors = [r.error_message for r in replies if r.error_message]
    assert len(errors) == 1
    assert errors[0].startswith("the request message cannot be decoded")
    assert sorted(r.infer_response.id for r in replies if not r.error_message) == ["good", "good"]


def test_statuses_never_leak_unknown(example_server: ServerProcess) -> None:
    client = tc.InferenceServerClient(example_server.url)

    for call in (
        lambda: client.get_model_metadata("no-such-model"),
        lambda: client.get_model_config("tabular_classifier", "99"),
        lambda: client.load_model("tabular_classifier"),  # not in explicit mode
        lambda: client.get_inference_statistics("no-such-model"),
    ):
        with pytest.raises(InferenceServerException) as info:
            call()
        assert info.value.status() not in ("StatusCode.UNKNOWN", "StatusCode.INTERNAL")
