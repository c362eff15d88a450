"""Atheris target: sluice's request decode/validate path on arbitrary bytes.

Each input is parsed as a ModelInferRequest by the server's own deserializer
(sluice.server.wire.parse_infer_request: raw contents stay views into the
input) and decoded by sluice.server.codec.decode_request, then its scheduling parameters
go through sluice.limits. A client error must be a SluiceError with a code the
edge maps (INVALID_ARGUMENT, RESOURCE_EXHAUSTED); anything else is a finding.

Run: python scripts/fuzz/decode_request_fuzz.py CORPUS_DIR -max_total_time=60
"""

from __future__ import annotations

import inspect
import sys

import atheris
from google.protobuf.message import DecodeError
from sluice import limits
from sluice.errors import ErrorCode, SluiceError
from sluice.server import codec, wire


def _instrument(*modules: object) -> int:
    """Coverage for the functions of `modules`, in place. (instrument_imports
    skips an editable install's custom loader; instrument_all takes minutes.)"""
    count = 0
    for module in modules:
        for value in vars(module).values():
            if inspect.isfunction(value) and value.__module__ == module.__name__:
                atheris.instrument_func(value)
                count += 1
    return count


_instrument(codec, limits, wire)

_CLIENT_ERRORS = {ErrorCode.INVALID_ARGUMENT, ErrorCode.RESOURCE_EXHAUSTED}


def test_one_input(data: bytes) -> None:
    try:
        msg = wire.parse_infer_request(data)
    except DecodeError:
        return  # the error edge answers these INVALID_ARGUMENT
    try:
        request = codec.decode_request(msg, 0)
        for key in limits.PARAMETER_RANGES:
            limits.int_parameter(request.parameters, key, request.model_name)
    except SluiceError as exc:
        if exc.code not in _CLIENT_ERRORS:
            raise
        if "\n" in exc.message or len(exc.message) > 4096:
            raise AssertionError(
                f"error message not one bounded line: {exc.message[:200]!r}"
            ) from None


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
