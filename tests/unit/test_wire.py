"""server/wire.py: ModelInfer parsed and serialized without copying tensors
gives exactly the messages protobuf gives, and anything odd falls back to
protobuf's own parse (its error, or its result)."""

from __future__ import annotations

import numpy as np
import pytest
import sluice_proto_pool  # noqa: F401  (before any sluice import: see its docstring)
from google.protobuf.message import DecodeError
from sluice.host.dataplane import InferOutput, InferResponse
from sluice.proto import grpc_service_pb2 as pb
from sluice.server import codec, wire


@pytest.fixture
def walk_every_message(monkeypatch: pytest.MonkeyPatch) -> None:
    """The split walk and the write from arrays for messages of any size
    (small ones go to protobuf)."""
    monkeypatch.setattr(wire, "SMALL_MESSAGE_BYTES", 0)


def _request(raws: list[bytes]) -> pb.ModelInferRequest:
    msg = pb.ModelInferRequest(model_name="m", model_version="2", id="r1")
    msg.parameters["priority"].int64_param = 3
    for i, raw in enumerate(raws):
        msg.inputs.add(name=f"x{i}", datatype="UINT8", shape=[len(raw)])
    msg.outputs.add(name="y")
    # Interleave: raw fields in the middle of the message still split out.
    msg.raw_input_contents.extend(raws)
    return msg


@pytest.mark.parametrize("raws", [[b"\x01\x02\x03"], [b"", b"abc" * 1000, bytes(range(256))]])
@pytest.mark.usefixtures("walk_every_message")
def test_parse_gives_protobufs_message_with_views(raws: list[bytes]) -> None:
    original = _request(raws)
    data = original.SerializeToString()
    # Put a field after the raw contents too (protobuf accepts any order).
    data += pb.ModelInferRequest(id="r2").SerializeToString()
    parsed = wire.parse_infer_request(data)
    assert isinstance(parsed, wire.InferRequestMessage)
    assert [bytes(v) for v in parsed.raw_input_contents] == raws
    assert all(isinstance(v, memoryview) for v in parsed.raw_input_contents)
    expected = pb.ModelInferRequest.FromString(data)
    expected.ClearField("raw_input_contents")
    assert parsed.message == expected
    assert parsed.id == "r2"  # attributes read through to the message


@pytest.mark.usefixtures("walk_every_message")
def test_views_are_released_after_decode() -> None:
    x = np.arange(6, dtype=np.float32)
    msg = pb.ModelInferRequest(model_name="m")
    msg.inputs.add(name="x", datatype="FP32", shape=[6])
    msg.raw_input_contents.append(x.tobytes())
    msg.outputs.add(name="y")
    msg.parameters["priority"].int64_param = 2
    parsed = wire.parse_infer_request(msg.SerializeToString())
    request = codec.decode_request(parsed, 0)
    assert request.inputs[0].data.tolist() == x.tolist()
    assert request.outputs == ["y"]
    assert request.parameters == {"priority": 2}
    assert isinstance(parsed, wire.InferRequestMessage)
    assert parsed.raw_input_contents == [b""]  # truthy still: the response goes raw
    assert parsed.model_name == "m"
    assert not hasattr(parsed.message, "inputs")  # the tensors are let go


def test_small_messages_are_protobufs_own_and_decode_the_same() -> None:
    x = np.arange(6, dtype=np.float32)
    msg = pb.ModelInferRequest(model_name="m", model_version="3", id="r9")
    msg.inputs.add(name="x", datatype="FP32", shape=[2, 3])
    msg.raw_input_contents.append(x.tobytes())
    data = msg.SerializeToString()
    assert len(data) <= wire.SMALL_MESSAGE_BYTES
    parsed = wire.parse_infer_request(data)
    assert parsed == msg  # a plain message: no walk for a few bytes
    request = codec.decode_request(parsed, 5)
    assert (request.model_name, request.model_version, request.id) == ("m", "3", "r9")
    assert request.inputs[0].data.tolist() == x.reshape(2, 3).tolist()
    assert request.received_ns == 5
    big = pb.ModelInferRequest(model_name="m")
    big.inputs.add(name="x", datatype="UINT8", shape=[wire.SMALL_MESSAGE_BYTES])
    big.raw_input_contents.append(b"\x07" * wire.SMALL_MESSAGE_BYTES)
    assert isinstance(wire.parse_infer_request(big.SerializeToString()), wire.InferRequestMessage)


@pytest.mark.usefixtures("walk_every_message")
def test_typed_requests_and_odd_messages() -> None:
    typed = pb.ModelInferRequest(model_name="m")
    typed.inputs.add(name="x", datatype="FP32", shape=[1]).contents.fp32_contents.append(1.0)
    parsed = wire.parse_infer_request(typed.SerializeToString())
    assert isinstance(parsed, wire.InferRequestMessage)
    assert parsed.message == typed
    assert not parsed.raw_input_contents
    for bad in (b"\x3a\xff\xff\xff\xff\x0f", b"\x3a\x10abc", b"\x0f", b"\x80"):
        with pytest.raises(DecodeError):
            wire.parse_infer_request(bad)
    # Past MAX_TOP_LEVEL_FIELDS fields the walk gives way to protobuf's parse.
    many = pb.ModelInferRequest(model_name="m")
    many.raw_input_contents.extend([b"a"] * (wire.MAX_TOP_LEVEL_FIELDS + 1))
    assert wire.parse_infer_request(many.SerializeToString()) == many


@pytest.mark.usefixtures("walk_every_message")
def test_serialize_equals_protobufs_encoding() -> None:
    outputs = [
        InferOutput("y", "FP32", (2, 3), np.arange(6, dtype=np.float32).reshape(2, 3)),
        InferOutput("z", "BYTES", (2,), np.array(["a", ""], dtype=object)),
        InferOutput("w", "INT64", (2,), np.arange(4, dtype=np.int64)[::2]),  # strided
    ]
    response = InferResponse("m", "1", "id7", outputs)
    fast = wire.serialize_infer_response(codec.encode_response_for_wire(response, raw=True))
    assert pb.ModelInferResponse.FromString(fast) == codec.encode_response(response, raw=True)
    typed_outputs = [
        InferOutput("b", "BOOL", (3,), np.array([True, False, True])),
        InferOutput("w", "INT64", (2,), np.arange(4, dtype=np.int64)[::2]),
        InferOutput("y", "FP32", (2, 2), np.arange(4, dtype=np.float32).reshape(2, 2)),
        InferOutput("z", "BYTES", (1,), np.array(["é"], dtype=object)),
        InferOutput("d", "FP64", (0,), np.zeros(0, np.float64)),
        InferOutput("e", "FP64", (2,), np.array([1.5, -2.0], dtype=">f8")),  # big-endian
    ]
    response = InferResponse("m", "1", "id8", typed_outputs)
    fast = wire.serialize_infer_response(codec.encode_response_for_wire(response, raw=False))
    # The same message, outputs in the same order, as protobuf's own encoding.
    assert pb.ModelInferResponse.FromString(fast) == codec.encode_response(response, raw=False)


@pytest.mark.parametrize("size", [4, wire.SMALL_MESSAGE_BYTES])
def test_stream_replies_are_the_stream_message_protobuf_would_write(size: int) -> None:
    out = np.arange(size, dtype=np.float32).reshape(1, size)
    response = InferResponse("m", "1", "id3", [InferOutput("y", "FP32", (1, size), out)])
    for raw in (True, False):
        reply = pb.ModelStreamInferResponse.FromString(codec.encode_stream_reply(response, raw))
        assert reply.infer_response == codec.encode_response(response, raw)
        assert not reply.error_message
