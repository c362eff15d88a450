"""KServe v2 REST bodies <-> the data plane's types.

An infer body is a JSON header, optionally followed by Triton's binary tensor
data: the request's `Inference-Header-Content-Length` header gives the JSON
length, each binary input's `parameters.binary_data_size` its byte count, in
input order. Binary inputs are decoded with np.frombuffer over the body (no
copy); JSON `data` may be flat (row-major) or nested. Outputs go back as JSON
`data` or, when asked for (`binary_data` per output, `binary_data_output` per
request), as binary blobs after the JSON header.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import orjson
from google.protobuf import json_format
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from sluice import datatypes
from sluice.errors import InvalidArgumentError, shown
from sluice.host.dataplane import InferInput, InferOutput, InferRequest, InferResponse
from sluice.server import codec

HEADER_LENGTH = "Inference-Header-Content-Length"

# Request parameters that steer this codec rather than the model.
_CODEC_PARAMETERS = frozenset({"binary_data_output"})

# dtypes orjson serialises straight from the array (no Python object per element).
_ORJSON_NATIVE = frozenset(
    np.dtype(t)
    for t in (
        np.bool_,
        np.int8,
        np.int16,
        np.int32,
        np.int64,
        np.uint8,
        np.uint16,
        np.uint32,
        np.uint64,
        np.float16,
        np.float32,
        np.float64,
    )
)


@dataclasses.dataclass
class DecodedInfer:
    request: InferRequest
    binary_default: bool  # the request's binary_data_output
    binary_outputs: dict[str, bool]  # per requested output, where it said


def _object(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise InvalidArgumentError(f"{where} must be a JSON object")
    return value


def _parameters(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    params = _object(value, f"{where} 'parameters'")
    for key, v in params.items():
        if not isinstance(v, bool | int | float | str):
            raise InvalidArgumentError(
                f"{where} parameter '{shown(str(key))}' must be a bool, number or string"
            )
    return params


def _shape(value: Any, where: str) -> tuple[int, ...]:
    if not isinstance(value, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) for d in value
    ):
        raise InvalidArgumentError(f"{where}: 'shape' must be a list of integers")
    return tuple(value)


def _decode_json_data(data: Any, dt: datatypes.DataType, shape: tuple[int, ...], where: str) -> Any:
    count = codec.element_count(shape, where)
    if not isinstance(data, list):
        data = [data]
    try:
        if dt.is_bytes:
            arr = np.array(data, dtype=object)
        else:
            assert dt.numpy is not None
            arr = np.array(data, dtype=dt.numpy)
    except (ValueError, TypeError, OverflowError) as exc:
        raise InvalidArgumentError(f"{where}: 'data' is not valid {dt.wire} data: {exc}") from None
    if arr.size != count:
        raise InvalidArgumentError(
            f"{where}: {arr.size} elements in 'data', expected {count} for shape {list(shape)}"
        )
    flat = arr.reshape(-1)
    if dt.is_bytes and not all(isinstance(v, str) for v in flat):
        raise InvalidArgumentError(f"{where}: BYTES 'data' elements must be JSON strings")
    return flat.reshape(shape)


def decode_infer(
    body: bytes,
    header_length: str | None,
    model_name: str,
    model_version: str,
    received_ns: int,
) -> DecodedInfer:
    """Parses an infer body (JSON, or JSON + binary tensors)."""
    view = memoryview(body)
    if header_length is None:
        json_end = len(body)
    else:
        try:
            json_end = int(header_length)
        except ValueError:
            json_end = -1
        if not 0 <= json_end <= len(body):
            raise InvalidArgumentError(
                f"{HEADER_LENGTH} is {header_length!r}; it must be an integer between 0 and the "
                f"body's {len(body)} bytes"
            )
    try:
        header = orjson.loads(view[:json_end])
    except orjson.JSONDecodeError as exc:
        raise InvalidArgumentError(
            f"the request's JSON cannot be parsed: {shown(str(exc), 160)}"
        ) from None
    header = _object(header, "the request")
    where_req = f"request for model '{shown(model_name)}'"
    params = _parameters(header.get("parameters"), where_req)
    binary_default = params.get("binary_data_output", False) is True
    request_id = header.get("id", "")
    if not isinstance(request_id, str):
        raise InvalidArgumentError(f"{where_req}: 'id' must be a string")
    raw_inputs = header.get("inputs")
    if not isinstance(raw_inputs, list):
        raise InvalidArgumentError(f"{where_req}: 'inputs' must be a list")
    offset = json_end
    inputs: list[InferInput] = []
    for item in raw_inputs:
        t = _object(item, f"an input of the {where_req}")
        name = t.get("name")
        if not isinstance(name, str):
            raise InvalidArgumentError(f"an input of the {where_req} has no 'name' string")
        where = f"input '{shown(name)}' for model '{shown(model_name)}'"
        wire = t.get("datatype")
        dt = datatypes.BY_WIRE.get(wire) if isinstance(wire, str) else None
        if dt is None:
            raise InvalidArgumentError(f"{where} has unknown datatype '{shown(str(wire))}'")
        if dt.numpy is None:
            raise InvalidArgumentError(f"{where}: {dt.wire} is not available in this build")
        shape = _shape(t.get("shape"), where)
        tparams = _parameters(t.get("parameters"), where)
        size = tparams.get("binary_data_size")
        if size is not None:
            if isinstance(size, bool) or not isinstance(size, int) or size < 0:
                raise InvalidArgumentError(f"{where}: 'binary_data_size' must be a byte count")
            if "data" in t:
                raise InvalidArgumentError(f"{where} has both 'data' and 'binary_data_size'")
            if offset + size > len(body):
                raise InvalidArgumentError(
                    f"{where}: binary_data_size {size} runs past the end of the body "
                    f"({len(body) - offset} bytes left)"
                )
            chunk = view[offset : offset + size]
            offset += size
            raw = bytes(chunk) if dt.is_bytes else chunk
            data = codec.decode_raw(raw, dt, shape, where)
        elif "data" in t:
            data = _decode_json_data(t["data"], dt, shape, where)
        else:
            raise InvalidArgumentError(f"{where} has neither 'data' nor 'binary_data_size'")
        inputs.append(InferInput(name, dt.wire, shape, data))
    if offset != len(body):
        raise InvalidArgumentError(
            f"{where_req}: {len(body) - offset} bytes of binary data follow the inputs that "
            "no input's binary_data_size accounts for"
        )
    outputs: list[str] = []
    binary_outputs: dict[str, bool] = {}
    raw_outputs = header.get("outputs", [])
    if not isinstance(raw_outputs, list):
        raise InvalidArgumentError(f"{where_req}: 'outputs' must be a list")
    for item in raw_outputs:
        o = _object(item, f"an output of the {where_req}")
        name = o.get("name")
        if not isinstance(name, str):
            raise InvalidArgumentError(f"an output of the {where_req} has no 'name' string")
        oparams = _parameters(o.get("parameters"), f"output '{shown(name)}'")
        if oparams.get("classification"):
            raise InvalidArgumentError(
                f"output '{shown(name)}': the classification extension is not supported"
            )
        if "binary_data" in oparams:
            binary_outputs[name] = oparams["binary_data"] is True
        outputs.append(name)
    request = InferRequest(
        model_name=model_name,
        model_version=model_version,
        id=request_id,
        inputs=inputs,
        outputs=outputs,
        parameters={k: v for k, v in params.items() if k not in _CODEC_PARAMETERS},
        received_ns=received_ns,
    )
    return DecodedInfer(request, binary_default, binary_outputs)


def _json_data(out: InferOutput) -> Any:
    flat = out.data.reshape(-1)
    if out.datatype == "BYTES":
        return [
            v if isinstance(v, str) else bytes(v).decode("utf-8", "replace") for v in flat.tolist()
        ]
    if flat.dtype in _ORJSON_NATIVE:
        return np.ascontiguousarray(flat)
    return flat.astype(np.float32).tolist()  # BF16: exact in float32


def encode_infer(
    response: InferResponse, binary_default: bool, binary_outputs: dict[str, bool]
) -> tuple[bytes, int | None]:
    """The response body, and the JSON header's length when binary data follows."""
    entries: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    for out in response.outputs:
        entry: dict[str, Any] = {"name": out.name, "datatype": out.datatype, "shape": out.shape}
        if binary_outputs.get(out.name, binary_default):
            blob = codec.raw_bytes(out)
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            entry["data"] = _json_data(out)
        entries.append(entry)
    header: dict[str, Any] = {
        "model_name": response.model_name,
        "model_version": response.model_version,
    }
    if response.id:
        header["id"] = response.id
    header["outputs"] = entries
    text = orjson.dumps(header, option=orjson.OPT_SERIALIZE_NUMPY)
    if not blobs:
        return text, None
    return b"".join([text, *blobs]), len(text)


def parse_json_object(body: bytes, what: str) -> dict[str, Any]:
    """A request body that must be a JSON object; an empty body is {}."""
    if not body.strip():
        return {}
    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidArgumentError(f"the {what} body cannot be parsed as JSON: {exc}") from None
    return _object(value, f"the {what} body")


_INT64_TYPES = frozenset(
    {
        FieldDescriptor.TYPE_INT64,
        FieldDescriptor.TYPE_UINT64,
        FieldDescriptor.TYPE_SINT64,
        FieldDescriptor.TYPE_FIXED64,
        FieldDescriptor.TYPE_SFIXED64,
    }
)


def _ints_back(descriptor: Any, d: dict[str, Any]) -> None:
    """proto3 JSON writes 64-bit integers as strings; Triton's HTTP API (and
    perf_analyzer, which reads counts and dims from it) has numbers."""
    for key, value in d.items():
        field = descriptor.fields_by_name.get(key)
        if field is None:
            continue
        sub = field.message_type
        if sub is not None:
            if sub.GetOptions().map_entry:
                value_field = sub.fields_by_name["value"]
                if value_field.message_type is not None:
                    for v in value.values():
                        _ints_back(value_field.message_type, v)
                elif value_field.type in _INT64_TYPES:
                    d[key] = {k: int(v) for k, v in value.items()}
            elif isinstance(value, list):
                for v in value:
                    _ints_back(sub, v)
            else:
                _ints_back(sub, value)
        elif field.type in _INT64_TYPES:
            d[key] = [int(v) for v in value] if isinstance(value, list) else int(value)


def message_json(message: Message) -> dict[str, Any]:
    """A protobuf message as Triton's HTTP API writes it: proto field names,
    default values present, integers as numbers."""
    d: dict[str, Any] = json_format.MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )
    _ints_back(message.DESCRIPTOR, d)
    return d


def parse_message(value: dict[str, Any], message: Message, what: str) -> None:
    """Fills `message` from a JSON object (proto field names or lowerCamelCase)."""
    try:
        json_format.ParseDict(value, message)
    except json_format.ParseError as exc:
        raise InvalidArgumentError(f"the {what} body is not valid: {exc}") from None
