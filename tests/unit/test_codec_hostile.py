"""Hostile request messages through the decode path (server/codec.py): every
one is a client error with a one-line bounded reason, never an exception the
edge would answer INTERNAL. Inputs found by scripts/fuzz.sh are replayed here
(scripts/fuzz/corpus/decode_request/finding_*)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import sluice_proto_pool  # noqa: F401  (before any sluice import: see its docstring)
from sluice import _core, limits
from sluice.errors import InvalidArgumentError, ResourceExhaustedError, SluiceError
from sluice.proto import grpc_service_pb2 as pb
from sluice.server import codec

FINDINGS = Path(__file__).resolve().parents[2] / "scripts" / "fuzz" / "corpus" / "decode_request"


def _raw(
    shape: list[int], data: bytes, datatype: str = "FP32", name: str = "x"
) -> pb.ModelInferRequest:
    msg = pb.ModelInferRequest(model_name="m")
    msg.inputs.add(name=name, datatype=datatype, shape=shape)
    msg.raw_input_contents.append(data)
    return msg


def _refused(msg: pb.ModelInferRequest) -> SluiceError:
    with pytest.raises((InvalidArgumentError, ResourceExhaustedError)) as err:
        codec.decode_request(msg, 0)
    assert "\n" not in err.value.message
    assert len(err.value.message) < 1024
    return err.value


@pytest.mark.parametrize(
    "shape", [[0, 1 << 62, 1 << 62], [0, 1 << 40], [1] * 40, [1 << 31, 2], [-1, 4]]
)
def test_shapes_no_array_can_take(shape: list[int]) -> None:
    _refused(_raw(shape, b""))


def test_long_names_are_shortened_in_errors() -> None:
    err = _refused(_raw([4], b"\x00", name="n" * 4096))
    assert "..." in err.message


def test_tensor_element_limit_is_resource_exhausted() -> None:
    saved = limits.current()
    limits.configure(limits.RequestLimits(max_tensor_elements=100))
    try:
        err = _refused(_raw([101], np.zeros(101, np.float32).tobytes()))
        assert isinstance(err, ResourceExhaustedError)
    finally:
        limits.configure(saved)


def test_typed_and_raw_decode_agree() -> None:
    values = np.arange(12, dtype=np.float32).reshape(3, 4)
    typed = pb.ModelInferRequest(model_name="m")
    t = typed.inputs.add(name="x", datatype="FP32", shape=[3, 4])
    t.contents.fp32_contents.extend(values.reshape(-1).tolist())
    got = codec.decode_request(typed, 0).inputs[0].data
    np.testing.assert_array_equal(got, values)
    raw = _raw([3, 4], values.tobytes())
    np.testing.assert_array_equal(codec.decode_request(raw, 0).inputs[0].data, values)
    s = pb.ModelInferRequest(model_name="m")
    s.inputs.add(name="s", datatype="BYTES", shape=[2]).contents.bytes_contents.extend(
        [b"a", "\u00e9".encode()]
    )
    assert list(codec.decode_request(s, 0).inputs[0].data) == ["a", "\u00e9"]
    bad = pb.ModelInferRequest(model_name="m")
    bad.inputs.add(name="s", datatype="BYTES", shape=[1]).contents.bytes_contents.append(b"\xff")
    assert "not valid UTF-8" in _refused(bad).message
    raw_bytes = _raw([2], _core.encode_bytes_tensor(["", "x"]), "BYTES", "s")
    assert list(codec.decode_request(raw_bytes, 0).inputs[0].data) == ["", "x"]


@pytest.mark.parametrize("path", sorted(FINDINGS.glob("finding_*")), ids=lambda p: p.name)
def test_fuzz_findings_stay_client_errors(path: Path) -> None:
    """What the harness does: decode, then range-check the parameters."""
    msg = pb.ModelInferRequest()
    msg.ParseFromString(path.read_bytes())

    def decode_and_check() -> None:
        request = codec.decode_request(msg, 0)
        for key in limits.PARAMETER_RANGES:
            limits.int_parameter(request.parameters, key, request.model_name)

    with pytest.raises((InvalidArgumentError, ResourceExhaustedError)) as err:
        decode_and_check()
    assert "\n" not in err.value.message
    assert len(err.value.message) < 1024
