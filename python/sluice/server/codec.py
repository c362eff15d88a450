"""KServe v2 wire tensors <-> numpy, for the data plane.

Raw contents are decoded with np.frombuffer (no copy; the array borrows the
request's bytes). BYTES go through the core's length-prefix codec.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from sluice import _core, datatypes, limits
from sluice.errors import InvalidArgumentError, shown
from sluice.host.dataplane import InferInput, InferOutput, InferRequest, InferResponse
from sluice.proto import grpc_service_pb2 as pb
from sluice.server import wire

# Typed `contents` field for each datatype; FP16 and BF16 exist only as raw.
_CONTENTS_FIELD = {
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


def _param_value(p: pb.InferParameter) -> Any:
    which = p.WhichOneof("parameter_choice")
    return getattr(p, which) if which else None


# No tensor may claim more elements than a message could carry (2 GiB bytes).
_MAX_ELEMENTS = 1 << 31


# numpy's dimension limit (NPY_MAXDIMS is 32 before numpy 2); no model needs more.
_MAX_RANK = 32


class Where:
    """Names the input in an error message ("input 'x' for model 'm'"),
    formatted only when an error is raised, not for every input of every request."""

    __slots__ = ("input_name", "model_name")

    def __init__(self, input_name: str, model_name: str) -> None:
        self.input_name = input_name
        self.model_name = model_name

    def __str__(self) -> str:
        return f"input '{_name(self.input_name)}' for model '{_name(self.model_name)}'"

    def __format__(self, spec: str) -> str:
        return format(str(self), spec)


def element_count(shape: tuple[int, ...], where: str | Where) -> int:
    if shape and min(shape) < 0:
        raise InvalidArgumentError(f"{where} has a negative dim in shape {_shape(shape)}")
    if len(shape) > _MAX_RANK:
        raise InvalidArgumentError(f"{where} has {len(shape)} dims; at most {_MAX_RANK}")
    count = math.prod(shape)  # Python ints: no silent int64 wrap-around
    # The product of the non-zero dims too: a zero-element tensor [0, 2^62, 2^62]
    # holds nothing but no array can take its shape (found by fuzzing).
    if count > _MAX_ELEMENTS or (count == 0 and math.prod(d for d in shape if d) > _MAX_ELEMENTS):
        raise InvalidArgumentError(f"{where}: shape {_shape(shape)} holds too many elements")
    limit = limits.current()
    if count > limit.max_tensor_elements:
        limit.check_elements(count, str(where))
    return count


def _shape(shape: tuple[int, ...]) -> str:
    """A shape for an error message, bounded however many dims a client sends."""
    text = str(list(shape[:8]))
    return text if len(shape) <= 8 else text[:-1] + f", ... ({len(shape)} dims)]"


def _name(name: str) -> str:
    """A client's name for an error message: one line, bounded."""
    return shown(name)


def decode_raw(
    raw: bytes | memoryview, dt: datatypes.DataType, shape: tuple[int, ...], where: str | Where
) -> Any:
    count = element_count(shape, where)
    if dt.is_bytes:
        # onnxruntime string tensors take str; the core validates the UTF-8.
        try:
            items = _core.decode_bytes_tensor(raw, count, True)
        except _core.StatusError as exc:
            raise InvalidArgumentError(f"{where}: {exc.args[1]}") from None
        arr = np.empty(count, dtype=object)
        arr[:] = items
        return arr.reshape(shape)
    assert dt.numpy is not None
    expected = count * dt.itemsize
    if len(raw) != expected:
        raise InvalidArgumentError(
            f"{where}: {len(raw)} bytes of raw data, expected {expected} "
            f"({count} {dt.wire} elements of shape {_shape(shape)})"
        )
    return np.frombuffer(raw, dtype=dt.numpy).reshape(shape)


def _decode_typed(
    tensor: pb.ModelInferRequest.InferInputTensor, dt: datatypes.DataType, where: Where
) -> Any:
    shape = tuple(tensor.shape)
    count = element_count(shape, where)
    field = _CONTENTS_FIELD.get(dt.wire)
    if field is None:
        raise InvalidArgumentError(
            f"{where}: {dt.wire} data can only be sent as raw_input_contents"
        )
    values = getattr(tensor.contents, field)
    if len(values) != count:
        raise InvalidArgumentError(
            f"{where}: {len(values)} elements in contents.{field}, expected {count} for shape "
            f"{_shape(shape)}"
        )
    # np.fromiter fills the array element by element: no intermediate list of
    # Python objects as large as the tensor (13x the payload for FP32 before).
    if dt.is_bytes:
        try:
            arr = np.fromiter((v.decode("utf-8") for v in values), dtype=object, count=count)
        except UnicodeDecodeError as exc:
            raise InvalidArgumentError(
                f"{where}: a BYTES element is not valid UTF-8 (onnxruntime string tensors hold "
                f"text): {exc.reason} at byte {exc.start}"
            ) from None
        return arr.reshape(shape)
    assert dt.numpy is not None
    try:
        return np.fromiter(values, dtype=dt.numpy, count=count).reshape(shape)
    except (OverflowError, ValueError, TypeError) as exc:
        raise InvalidArgumentError(f"{where}: value out of range for {dt.wire}: {exc}") from None


def decode_request(
    msg: pb.ModelInferRequest | wire.InferRequestMessage, received_ns: int
) -> InferRequest:
    """The data plane's request. Raw inputs become arrays over the received
    bytes (no copy); a wire.InferRequestMessage then lets go of its views."""
    # Per request: read each protobuf field once, build error text only to raise.
    m = msg.message if isinstance(msg, wire.InferRequestMessage) else msg
    raw = msg.raw_input_contents
    model_name = m.model_name
    tensors = m.inputs
    if raw and len(raw) != len(tensors):
        raise InvalidArgumentError(
            f"request for model '{_name(model_name)}' has {len(raw)} raw_input_contents for "
            f"{len(tensors)} inputs; raw contents need one entry per input, in order"
        )
    inputs = []
    for i, t in enumerate(tensors):
        name = t.name
        dt = datatypes.BY_WIRE.get(t.datatype)
        if dt is None or dt.numpy is None:
            where = Where(name, model_name)
            if dt is None:
                raise InvalidArgumentError(f"{where} has unknown datatype '{_name(t.datatype)}'")
            raise InvalidArgumentError(f"{where}: {dt.wire} is not available in this build")
        shape = tuple(t.shape)
        if raw:
            if t.HasField("contents"):
                raise InvalidArgumentError(
                    f"{Where(name, model_name)} sets contents while the request uses "
                    "raw_input_contents"
                )
            data = decode_raw(raw[i], dt, shape, Where(name, model_name))
        else:
            data = _decode_typed(t, dt, Where(name, model_name))
        inputs.append(InferInput(name, dt.wire, shape, data))
    wanted = m.outputs
    params = m.parameters
    request = InferRequest(
        model_name,
        m.model_version,
        m.id,
        inputs,
        [o.name for o in wanted] if wanted else [],
        {k: _param_value(v) for k, v in params.items()} if params else {},
        received_ns,
    )
    if isinstance(msg, wire.InferRequestMessage):
        msg.release(request.model_name, request.model_version, request.id)
    return request


def raw_bytes(out: InferOutput) -> bytes:
    if out.datatype == "BYTES":
        return _core.encode_bytes_tensor(out.data.reshape(-1).tolist())
    # tobytes() on a C-contiguous little-endian array is one memcpy.
    return np.ascontiguousarray(out.data).tobytes()


# Typed responses are filled in chunks: the Python objects of one chunk at a
# time, never a list as long as the tensor.
_FILL_CHUNK = 1 << 16


def _fill_typed(tensor: pb.ModelInferResponse.InferOutputTensor, out: InferOutput) -> None:
    field = getattr(tensor.contents, _CONTENTS_FIELD[out.datatype])
    flat = out.data.reshape(-1)
    for start in range(0, flat.size, _FILL_CHUNK):
        chunk = flat[start : start + _FILL_CHUNK].tolist()
        if out.datatype == "BYTES":
            chunk = [v.encode("utf-8") if isinstance(v, str) else bytes(v) for v in chunk]
        field.extend(chunk)


def _small(resp: InferResponse) -> bool:
    """Outputs small enough that protobuf's encoding (C, one copy more) costs
    less than writing the message from the arrays (Python, per field)."""
    return sum(o.data.nbytes for o in resp.outputs) <= wire.SMALL_MESSAGE_BYTES


def encode_response_for_wire(
    resp: InferResponse, raw: bool
) -> pb.ModelInferResponse | wire.InferResponseMessage:
    """As encode_response, but raw outputs, and typed FP32/FP64/BOOL ones, stay
    arrays until gRPC serializes the response (wire.serialize_infer_response
    copies each once, into the bytes sent). Small responses are protobuf's."""
    if _small(resp):
        return encode_response(resp, raw)
    return _from_arrays(resp, raw)


def _from_arrays(resp: InferResponse, raw: bool) -> wire.InferResponseMessage:
    """The response with its tensors left as arrays, for wire.py to write."""
    msg = pb.ModelInferResponse(model_name=resp.model_name, model_version=resp.model_version)
    msg.id = resp.id
    use_raw = raw or any(o.datatype not in _CONTENTS_FIELD for o in resp.outputs)
    if use_raw:
        arrays: list[Any] = []
        for out in resp.outputs:
            msg.outputs.add(name=out.name, datatype=out.datatype, shape=list(out.shape))
            arrays.append(raw_bytes(out) if out.datatype == "BYTES" else out.data)
        return wire.InferResponseMessage(msg, arrays)
    typed: list[tuple[bytes, int, Any]] = []
    for out in resp.outputs:
        tensor = pb.ModelInferResponse.InferOutputTensor(
            name=out.name, datatype=out.datatype, shape=list(out.shape)
        )
        number = wire.PACKED_FIELDS.get(out.datatype, 0)
        if not number:  # varint or BYTES contents: protobuf encodes them
            _fill_typed(tensor, out)
        typed.append((tensor.SerializeToString(), number, out.data if number else None))
    return wire.InferResponseMessage(msg, [], typed)


def encode_stream_reply(resp: InferResponse, raw: bool) -> bytes:
    """A serialized ModelStreamInferResponse holding the response."""
    if _small(resp):
        reply = pb.ModelStreamInferResponse()
        encode_response(resp, raw, reply.infer_response)
        return bytes(reply.SerializeToString())
    return wire.serialize_stream_response(_from_arrays(resp, raw))


def encode_response(
    resp: InferResponse, raw: bool, msg: pb.ModelInferResponse | None = None
) -> pb.ModelInferResponse:
    """Raw output contents when the request used raw (or an output has no typed
    form, FP16/BF16); typed contents otherwise. Fills `msg` when given."""
    if msg is None:
        msg = pb.ModelInferResponse()
    msg.model_name = resp.model_name
    msg.model_version = resp.model_version
    msg.id = resp.id
    use_raw = raw or any(o.datatype not in _CONTENTS_FIELD for o in resp.outputs)
    for out in resp.outputs:
        tensor = msg.outputs.add(name=out.name, datatype=out.datatype, shape=list(out.shape))
        if use_raw:
            msg.raw_output_contents.append(raw_bytes(out))
        else:
            _fill_typed(tensor, out)
    return msg
