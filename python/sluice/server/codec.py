"""KServe v2 wire tensors <-> numpy, for the data plane.

Raw contents are decoded with np.frombuffer (no copy; the array borrows the
request's bytes). BYTES go through the core's length-prefix codec.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from sluice import _core, datatypes
from sluice.errors import InvalidArgumentError
from sluice.host.dataplane import InferInput, InferOutput, InferRequest, InferResponse
from sluice.proto import grpc_service_pb2 as pb

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


def _element_count(shape: tuple[int, ...], where: str) -> int:
    if any(d < 0 for d in shape):
        raise InvalidArgumentError(f"{where} has a negative dim in shape {list(shape)}")
    count = math.prod(shape)  # Python ints: no silent int64 wrap-around
    if count > _MAX_ELEMENTS:
        raise InvalidArgumentError(f"{where}: shape {list(shape)} holds too many elements")
    return count


def _decode_raw(raw: bytes, dt: datatypes.DataType, shape: tuple[int, ...], where: str) -> Any:
    count = _element_count(shape, where)
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
            f"({count} {dt.wire} elements of shape {list(shape)})"
        )
    return np.frombuffer(raw, dtype=dt.numpy).reshape(shape)


def _decode_typed(
    tensor: pb.ModelInferRequest.InferInputTensor, dt: datatypes.DataType, where: str
) -> Any:
    shape = tuple(tensor.shape)
    count = _element_count(shape, where)
    field = _CONTENTS_FIELD.get(dt.wire)
    if field is None:
        raise InvalidArgumentError(
            f"{where}: {dt.wire} data can only be sent as raw_input_contents"
        )
    values = getattr(tensor.contents, field)
    if len(values) != count:
        raise InvalidArgumentError(
            f"{where}: {len(values)} elements in contents.{field}, expected {count} for shape "
            f"{list(shape)}"
        )
    if dt.is_bytes:
        arr = np.empty(count, dtype=object)
        try:
            arr[:] = [v.decode("utf-8") for v in values]
        except UnicodeDecodeError as exc:
            raise InvalidArgumentError(
                f"{where}: a BYTES element is not valid UTF-8 (onnxruntime string tensors hold "
                f"text): {exc}"
            ) from None
        return arr.reshape(shape)
    assert dt.numpy is not None
    try:
        return np.array(values, dtype=dt.numpy).reshape(shape)
    except OverflowError as exc:
        raise InvalidArgumentError(f"{where}: value out of range for {dt.wire}: {exc}") from None


def decode_request(msg: pb.ModelInferRequest, received_ns: int) -> InferRequest:
    model = msg.model_name
    raw = msg.raw_input_contents
    if raw and len(raw) != len(msg.inputs):
        raise InvalidArgumentError(
            f"request for model '{model}' has {len(raw)} raw_input_contents for "
            f"{len(msg.inputs)} inputs; raw contents need one entry per input, in order"
        )
    inputs = []
    for i, t in enumerate(msg.inputs):
        where = f"input '{t.name}' for model '{model}'"
        dt = datatypes.BY_WIRE.get(t.datatype)
        if dt is None:
            raise InvalidArgumentError(f"{where} has unknown datatype '{t.datatype}'")
        if dt.numpy is None:
            raise InvalidArgumentError(f"{where}: {dt.wire} is not available in this build")
        shape = tuple(t.shape)
        if raw:
            if t.HasField("contents"):
                raise InvalidArgumentError(
                    f"{where} sets contents while the request uses raw_input_contents"
                )
            data = _decode_raw(raw[i], dt, shape, where)
        else:
            data = _decode_typed(t, dt, where)
        inputs.append(InferInput(t.name, dt.wire, shape, data))
    return InferRequest(
        model_name=model,
        model_version=msg.model_version,
        id=msg.id,
        inputs=inputs,
        outputs=[o.name for o in msg.outputs],
        parameters={k: _param_value(v) for k, v in msg.parameters.items()},
        received_ns=received_ns,
    )


def _raw_bytes(out: InferOutput) -> bytes:
    if out.datatype == "BYTES":
        return _core.encode_bytes_tensor(out.data.reshape(-1).tolist())
    # tobytes() on a C-contiguous little-endian array is one memcpy.
    return np.ascontiguousarray(out.data).tobytes()


def _fill_typed(tensor: pb.ModelInferResponse.InferOutputTensor, out: InferOutput) -> None:
    field = _CONTENTS_FIELD[out.datatype]
    flat = out.data.reshape(-1)
    if out.datatype == "BYTES":
        values = [v.encode("utf-8") if isinstance(v, str) else bytes(v) for v in flat.tolist()]
    else:
        values = flat.tolist()
    getattr(tensor.contents, field).extend(values)


def encode_response(resp: InferResponse, raw: bool) -> pb.ModelInferResponse:
    """Raw output contents when the request used raw (or an output has no typed
    form, FP16/BF16); typed contents otherwise."""
    msg = pb.ModelInferResponse(model_name=resp.model_name, model_version=resp.model_version)
    msg.id = resp.id
    use_raw = raw or any(o.datatype not in _CONTENTS_FIELD for o in resp.outputs)
    for out in resp.outputs:
        tensor = msg.outputs.add(name=out.name, datatype=out.datatype, shape=list(out.shape))
        if use_raw:
            msg.raw_output_contents.append(_raw_bytes(out))
        else:
            _fill_typed(tensor, out)
    return msg
