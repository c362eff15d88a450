"""datatypes: the config-enum lookup and the one generator of synthetic inputs
(sluice infer --random, sluice bench, warm-up)."""

from __future__ import annotations

import numpy as np
import pytest
from sluice import datatypes
from sluice.proto import model_config_pb2 as mc


@pytest.mark.parametrize("dt", datatypes.ALL, ids=lambda d: d.wire)
def test_by_config_enum_maps_every_enum_value(dt: datatypes.DataType) -> None:
    assert datatypes.by_config_enum(mc.DataType.Value(dt.config)) is dt


@pytest.mark.parametrize("dt", datatypes.ALL, ids=lambda d: d.wire)
@pytest.mark.parametrize("fill", datatypes.FILLS)
def test_generated_has_the_shape_and_type(dt: datatypes.DataType, fill: str) -> None:
    arr = datatypes.generated(dt, [3, 2], np.random.default_rng(0), fill)
    assert arr.shape == (3, 2)
    if dt.is_bytes:
        assert arr.dtype == object
        values = arr.reshape(-1).tolist()
        if fill == "zero":
            assert values == [""] * 6
        else:
            assert all(isinstance(v, str) and len(v) == 8 and v.isalpha() for v in values)
        return
    assert arr.dtype == dt.numpy
    if fill == "zero":
        assert not arr.astype(np.float64).any()
    elif dt.wire not in ("FP16", "FP32", "FP64", "BF16"):
        as_int = arr.astype(np.int64)
        assert as_int.min() >= 0
        assert as_int.max() <= (1 if dt.wire == "BOOL" else 9)


def test_generated_random_floats_vary_and_refuses_unknown_fills() -> None:
    arr = datatypes.generated(datatypes.BY_WIRE["FP32"], [1000], np.random.default_rng(1))
    assert 0.5 < float(arr.std()) < 1.5  # standard normal
    with pytest.raises(ValueError, match="fill"):
        datatypes.generated(datatypes.BY_WIRE["FP32"], [1], np.random.default_rng(), "ones")
