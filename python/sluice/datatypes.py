"""Tensor datatypes: one table relating the KServe v2 wire name, Triton's config
enum name, numpy and onnxruntime. Everything else looks types up here."""

from __future__ import annotations

import dataclasses
import string
from collections.abc import Sequence
from typing import Any

import numpy as np

try:  # numpy has no bfloat16; ml_dtypes (a dependency of onnx) provides it.
    import ml_dtypes

    _BF16: np.dtype[Any] | None = np.dtype(ml_dtypes.bfloat16)
except ImportError:  # pragma: no cover - ml_dtypes comes with onnx
    _BF16 = None


@dataclasses.dataclass(frozen=True)
class DataType:
    wire: str  # KServe v2 datatype string, e.g. "FP32"
    config: str  # Triton ModelConfig enum name, e.g. "TYPE_FP32"
    onnx: str  # onnxruntime type string, e.g. "tensor(float)"
    numpy: np.dtype[Any] | None  # None: no numpy dtype (object for BYTES)
    itemsize: int  # bytes per element on the wire; 0 for BYTES (variable)

    @property
    def is_bytes(self) -> bool:
        return self.wire == "BYTES"


def _dt(wire: str, config: str, onnx: str, numpy: Any, itemsize: int) -> DataType:
    return DataType(wire, config, onnx, None if numpy is None else np.dtype(numpy), itemsize)


ALL: tuple[DataType, ...] = (
    _dt("BOOL", "TYPE_BOOL", "tensor(bool)", np.bool_, 1),
    _dt("UINT8", "TYPE_UINT8", "tensor(uint8)", np.uint8, 1),
    _dt("UINT16", "TYPE_UINT16", "tensor(uint16)", np.uint16, 2),
    _dt("UINT32", "TYPE_UINT32", "tensor(uint32)", np.uint32, 4),
    _dt("UINT64", "TYPE_UINT64", "tensor(uint64)", np.uint64, 8),
    _dt("INT8", "TYPE_INT8", "tensor(int8)", np.int8, 1),
    _dt("INT16", "TYPE_INT16", "tensor(int16)", np.int16, 2),
    _dt("INT32", "TYPE_INT32", "tensor(int32)", np.int32, 4),
    _dt("INT64", "TYPE_INT64", "tensor(int64)", np.int64, 8),
    _dt("FP16", "TYPE_FP16", "tensor(float16)", np.float16, 2),
    _dt("FP32", "TYPE_FP32", "tensor(float)", np.float32, 4),
    _dt("FP64", "TYPE_FP64", "tensor(double)", np.float64, 8),
    _dt("BYTES", "TYPE_STRING", "tensor(string)", np.object_, 0),
    DataType("BF16", "TYPE_BF16", "tensor(bfloat16)", _BF16, 2),
)

BY_WIRE: dict[str, DataType] = {d.wire: d for d in ALL}
BY_CONFIG: dict[str, DataType] = {d.config: d for d in ALL}
BY_ONNX: dict[str, DataType] = {d.onnx: d for d in ALL}
_BY_NUMPY: dict[np.dtype[Any], DataType] = {d.numpy: d for d in ALL if d.numpy is not None}


def from_numpy(dtype: np.dtype[Any]) -> DataType:
    """The datatype of a numpy array (str/bytes arrays are BYTES)."""
    found = _BY_NUMPY.get(dtype)  # the common case: one dict lookup per output
    if found is not None:
        return found
    if dtype.kind in ("U", "S", "O"):
        return BY_WIRE["BYTES"]
    raise TypeError(f"numpy dtype {dtype} has no KServe v2 datatype")


def by_config_enum(data_type: int) -> DataType:
    """The DataType of a ModelConfig DataType enum value (mc.TYPE_FP32, ...)."""
    return _BY_CONFIG_ENUM[data_type]


def wire_name(data_type: int) -> str:
    """The KServe v2 wire name ("FP32") of a ModelConfig DataType enum value."""
    return _BY_CONFIG_ENUM[data_type].wire


def _config_enum_table() -> dict[int, DataType]:
    from sluice.proto import model_config_pb2 as mc

    return {mc.DataType.Value(d.config): d for d in ALL}


_BY_CONFIG_ENUM: dict[int, DataType] = _config_enum_table()


_LETTERS = np.array(list(string.ascii_lowercase))
FILLS = ("zero", "random")


def generated(
    dt: DataType, shape: Sequence[int], rng: np.random.Generator, fill: str = "random"
) -> np.ndarray[Any, Any]:
    """Generated data of one datatype, the one generator behind `sluice infer
    --random`, `sluice bench` and warm-up. "zero": zeros (empty strings for
    BYTES). "random": floats standard normal; integers 0-9 (valid for unsigned
    types, and as indices or token ids); bools 0/1; BYTES short random lowercase
    words (valid UTF-8, so text models accept them), as an object array of str."""
    if fill not in FILLS:
        raise ValueError(f"fill must be one of {FILLS}, not {fill!r}")
    shape = list(shape)
    if dt.is_bytes:
        if fill == "zero":
            return np.full(shape, "", dtype=object)
        count = int(np.prod(shape, dtype=np.int64))
        words = ["".join(row) for row in rng.choice(_LETTERS, size=(count, 8))]
        return np.array(words, dtype=object).reshape(shape)
    assert dt.numpy is not None
    if fill == "zero":
        return np.zeros(shape, dtype=dt.numpy)
    if dt.numpy.kind == "f" or dt.wire == "BF16":
        return rng.standard_normal(shape).astype(dt.numpy)
    if dt.numpy.kind == "b":
        return rng.integers(0, 2, size=shape).astype(np.bool_)
    return rng.integers(0, 10, size=shape).astype(dt.numpy)
