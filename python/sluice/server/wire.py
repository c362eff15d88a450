"""ModelInfer's wire format without copies of the tensor payloads.

protobuf copies every bytes field it parses or serializes: a raw input is
copied into the parsed message and copied again when Python reads it; a raw
output is copied into the response message and again when it is serialized.
For the one message that carries tensors, this module does it by hand:

- parse: the top-level fields of a ModelInferRequest are walked (a handful per
  request); each raw_input_contents entry becomes a memoryview into the
  received bytes, and protobuf parses only the rest (names, shapes, params);
- serialize: protobuf serializes the response without its tensors, and each
  output array is appended as a raw_output_contents field (or, for typed FP32,
  FP64 and BOOL outputs, as packed contents, whose wire form is the array's
  little-endian bytes), so the only copy is into the bytes gRPC sends.

Repeated fields may appear in any order on the wire and concatenate, so the
result is the same message protobuf would make. Anything unusual (more than
MAX_TOP_LEVEL_FIELDS fields, a malformed tag) falls back to protobuf's own
parse, which then names the problem.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from sluice.proto import grpc_service_pb2 as pb

RAW_INPUT_FIELD = 7  # ModelInferRequest.raw_input_contents
RAW_OUTPUT_FIELD = 6  # ModelInferResponse.raw_output_contents
OUTPUTS_FIELD = 5  # ModelInferResponse.outputs
STREAM_INFER_RESPONSE_FIELD = 2  # ModelStreamInferResponse.infer_response
CONTENTS_FIELD = 5  # InferOutputTensor.contents
# Typed contents whose packed wire form is the array's little-endian bytes
# (fixed-width floats; bools are one-byte varints 0/1): InferTensorContents fields.
PACKED_FIELDS = {"FP32": 6, "FP64": 7, "BOOL": 1}
_LENGTH_DELIMITED = 2
# A request has a few fields per input; past this many the walk (Python, per
# field) stops being cheap, and protobuf's parse (C) takes over.
MAX_TOP_LEVEL_FIELDS = 4096
# Up to this size protobuf's parse (C, copying) is cheaper than the walk
# (Python, per field): copies of a few KiB cost less than a microsecond.
SMALL_MESSAGE_BYTES = 16 * 1024


class _Malformed(Exception):
    pass


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(data) or shift > 63:
            raise _Malformed
        b = data[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result, pos
        shift += 7


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _split(data: bytes, field: int) -> tuple[list[memoryview], list[memoryview]]:
    """(the other fields' bytes, field `field`'s payloads), as views of `data`."""
    view = memoryview(data)
    rest: list[memoryview] = []
    payloads: list[memoryview] = []
    pos = kept = count = 0
    end = len(data)
    while pos < end:
        count += 1
        if count > MAX_TOP_LEVEL_FIELDS:
            raise _Malformed
        start = pos
        tag, pos = _varint(data, pos)
        number, kind = tag >> 3, tag & 7
        if kind == 0:
            _, pos = _varint(data, pos)
        elif kind == 1:
            pos += 8
        elif kind == 5:
            pos += 4
        elif kind == _LENGTH_DELIMITED:
            length, pos = _varint(data, pos)
            if number == field:
                if pos + length > end:
                    raise _Malformed
                rest.append(view[kept:start])
                payloads.append(view[pos : pos + length])
                kept = pos + length
            pos += length
        else:
            raise _Malformed
        if pos > end:
            raise _Malformed
    rest.append(view[kept:])
    return rest, payloads


class InferRequestMessage:
    """A parsed ModelInferRequest whose raw_input_contents are views into the
    received message. Reads like the message (attributes pass through).

    `release()`: once the tensors were built (raw ones keep the bytes they view
    alive), the message lets go of its tensors: typed contents parsed by
    protobuf are freed before the model runs, not when gRPC drops the request."""

    __slots__ = ("message", "raw_input_contents")

    def __init__(self, message: pb.ModelInferRequest, raw: list[Any]) -> None:
        # The parsed message; once released, only its names and id (_Released).
        self.message: Any = message
        self.raw_input_contents: list[Any] = raw

    def __getattr__(self, name: str) -> Any:
        return getattr(self.message, name)

    def release(self, model_name: str, model_version: str, request_id: str) -> None:
        # What is read after decoding stays: the names and id (the caller read
        # them already), and the raw entries' count and truthiness (the
        # response's encoding follows the request's); the tensors go.
        self.message = _Released(model_name, model_version, request_id)
        self.raw_input_contents = [b""] * len(self.raw_input_contents)


class _Released:
    """What a released InferRequestMessage still answers: its names and id."""

    __slots__ = ("id", "model_name", "model_version")

    def __init__(self, model_name: str, model_version: str, request_id: str) -> None:
        self.model_name = model_name
        self.model_version = model_version
        self.id = request_id


def parse_infer_request(data: bytes) -> pb.ModelInferRequest | InferRequestMessage:
    """gRPC's request deserializer for ModelInfer and ModelStreamInfer."""
    if len(data) <= SMALL_MESSAGE_BYTES:
        return pb.ModelInferRequest.FromString(data)
    try:
        rest, raw = _split(data, RAW_INPUT_FIELD)
    except _Malformed:
        return pb.ModelInferRequest.FromString(data)
    if not raw:
        return InferRequestMessage(pb.ModelInferRequest.FromString(data), [])
    return InferRequestMessage(pb.ModelInferRequest.FromString(b"".join(rest)), raw)


def _as_bytes(arr: np.ndarray[Any, Any]) -> memoryview:
    """A little-endian C-contiguous array's bytes, without a copy where it
    already is one (dtypes numpy cannot export, bfloat16, go as uint8)."""
    little = arr.astype(arr.dtype.newbyteorder("<"), copy=False)
    return np.ascontiguousarray(little).reshape(-1).view(np.uint8).data


def _field(number: int, size: int) -> bytes:
    """The tag and length of a length-delimited field of `size` bytes."""
    return _encode_varint((number << 3) | _LENGTH_DELIMITED) + _encode_varint(size)


class InferResponseMessage:
    """A ModelInferResponse whose tensors are still arrays: serialized by
    `serialize_infer_response` straight from them.

    raw_outputs: raw_output_contents entries (arrays, or encoded BYTES);
    typed_outputs: (an InferOutputTensor serialized without its contents,
    PACKED_FIELDS field number, array) per output, in order; field number 0:
    the tensor holds its contents (types protobuf must encode), no array."""

    __slots__ = ("message", "raw_outputs", "typed_outputs")

    def __init__(
        self,
        message: pb.ModelInferResponse,
        raw_outputs: list[Any],
        typed_outputs: list[tuple[bytes, int, Any]] | None = None,
    ) -> None:
        self.message = message  # everything but the tensors below
        self.raw_outputs: list[Any] | None = raw_outputs
        self.typed_outputs = typed_outputs

    def __getattr__(self, name: str) -> Any:
        return getattr(self.message, name)


def _response_parts(response: InferResponseMessage) -> list[Any]:
    """The response's serialized pieces, each output array as a view of its
    bytes (one copy later, when they are joined). The arrays are dropped."""
    parts: list[Any] = [response.message.SerializeToString()]
    for tensor, number, arr in response.typed_outputs or []:
        if not number:  # its contents are in `tensor` already
            parts += [_field(OUTPUTS_FIELD, len(tensor)), tensor]
            continue
        data = _as_bytes(arr)
        if not data.nbytes:  # as protobuf: no elements, no contents field
            parts += [_field(OUTPUTS_FIELD, len(tensor)), tensor]
            continue
        packed = _field(number, data.nbytes)
        contents = _field(CONTENTS_FIELD, len(packed) + data.nbytes)
        size = len(tensor) + len(contents) + len(packed) + data.nbytes
        parts += [_field(OUTPUTS_FIELD, size), tensor, contents, packed, data]
    for arr in response.raw_outputs or []:
        data = _as_bytes(arr) if isinstance(arr, np.ndarray) else memoryview(arr)
        parts += [_field(RAW_OUTPUT_FIELD, data.nbytes), data]
    # gRPC keeps the response while it sends: not its arrays.
    response.raw_outputs = response.typed_outputs = None
    return parts


def serialize_infer_response(response: pb.ModelInferResponse | InferResponseMessage) -> bytes:
    """gRPC's response serializer for ModelInfer: one copy of each raw output,
    into the bytes sent. The arrays are dropped once copied."""
    if not isinstance(response, InferResponseMessage):
        return bytes(response.SerializeToString())
    return b"".join(_response_parts(response))


def serialize_stream_response(response: InferResponseMessage) -> bytes:
    """A ModelStreamInferResponse holding `response`, written as
    serialize_infer_response writes it: the stream message's one field is a
    prefix (its tag and length), not a second encoding."""
    parts = _response_parts(response)
    size = sum(len(p) if isinstance(p, bytes) else p.nbytes for p in parts)
    return b"".join([_field(STREAM_INFER_RESPONSE_FIELD, size), *parts])


def serialize_stream_reply(reply: bytes | pb.ModelStreamInferResponse) -> bytes:
    """gRPC's response serializer for ModelStreamInfer: replies written by
    serialize_stream_response pass as they are; errors are messages."""
    if isinstance(reply, bytes):
        return reply
    return bytes(reply.SerializeToString())


# The methods whose requests and responses go through this module, for the
# error edge that installs (de)serializers: method -> (deserializer, serializer).
CODECS: dict[str, tuple[Any, Any]] = {
    "/inference.GRPCInferenceService/ModelInfer": (
        parse_infer_request,
        serialize_infer_response,
    ),
    "/inference.GRPCInferenceService/ModelStreamInfer": (
        parse_infer_request,
        serialize_stream_reply,
    ),
}
