"""A request's inputs and outputs checked against a loaded version's signature.

The signature is read out of the version's ModelConfig once, on its first
request (the version is READY by then, so its config is complete and no longer
changes), and kept on the version: the request path does dict and tuple
lookups instead of protobuf attribute reads per request and input.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

import numpy as np

from sluice import datatypes
from sluice.errors import InvalidArgumentError, shown
from sluice.proto import model_config_pb2 as mc

if TYPE_CHECKING:
    from sluice.host.dataplane import InferInput, InferRequest
    from sluice.host.lifecycle import ModelVersion

Array = np.ndarray[Any, Any]


@dataclasses.dataclass(frozen=True)
class InputSpec:
    name: str
    datatype: str  # KServe v2 wire name
    expected: tuple[int, ...]  # the batch dim (-1) first when the model batches
    fixed: tuple[tuple[int, int], ...]  # (axis, size) for every dim that is not -1
    reshape: tuple[int, ...] | None  # the config's reshape, without the batch dim
    optional: bool


@dataclasses.dataclass(frozen=True)
class Signature:
    config: mc.ModelConfig  # the config it was read from (identity checked)
    inputs: dict[str, InputSpec]
    required: tuple[str, ...]
    output_names: tuple[str, ...]
    max_batch_size: int


def signature(mv: ModelVersion) -> Signature:
    sig: Signature | None = mv.signature
    if sig is None or sig.config is not mv.config:
        sig = mv.signature = _read(mv.config)
    return sig


def _read(config: mc.ModelConfig) -> Signature:
    batching = config.max_batch_size > 0
    inputs: dict[str, InputSpec] = {}
    for t in config.input:
        expected = ((-1,) if batching else ()) + tuple(t.dims)
        inputs[t.name] = InputSpec(
            name=t.name,
            datatype=datatypes.wire_name(t.data_type),
            expected=expected,
            fixed=tuple((i, e) for i, e in enumerate(expected) if e != -1),
            reshape=tuple(t.reshape.shape) if t.HasField("reshape") else None,
            optional=t.optional,
        )
    return Signature(
        config=config,
        inputs=inputs,
        required=tuple(n for n, s in inputs.items() if not s.optional),
        output_names=tuple(o.name for o in config.output),
        max_batch_size=config.max_batch_size,
    )


def _shape_str(shape: tuple[int, ...]) -> str:
    return "[" + ",".join(str(d) for d in shape) + "]"


def validate_inputs(mv: ModelVersion, request: InferRequest) -> tuple[dict[str, Array], int]:
    """The request's inputs as the model's feeds (reshaped per the config) and
    its batch size. Raises InvalidArgumentError, counting schema skew."""
    sig = signature(mv)
    declared = sig.inputs
    model = mv.name
    given: dict[str, InferInput] = {}
    for inp in request.inputs:
        if inp.name not in declared:
            # Not the client's name: labels must not grow with what clients send.
            mv.stats.count_schema_skew("(unknown)", "name")
            raise InvalidArgumentError(
                f"unexpected inference input '{shown(inp.name)}' for model '{model}'; it "
                "expects "
                f"{', '.join(repr(n) for n in declared)}"
            )
        if inp.name in given:
            raise InvalidArgumentError(
                f"input '{shown(inp.name)}' appears twice in the request for model '{model}'"
            )
        given[inp.name] = inp
    if len(given) < len(sig.required) or any(n not in given for n in sig.required):
        missing = [n for n in sig.required if n not in given]
        for m in missing:
            mv.stats.count_schema_skew(m, "name")
        raise InvalidArgumentError(
            f"expected {len(declared)} inputs but got {len(given)} inputs for model "
            f"'{model}'; missing required input(s) {', '.join(repr(m) for m in missing)}"
        )
    batching = sig.max_batch_size > 0
    feeds: dict[str, Array] = {}
    batch_sizes: dict[str, int] = {}
    for name, inp in given.items():
        spec = declared[name]
        if inp.datatype != spec.datatype:
            mv.stats.count_schema_skew(name, "datatype")
            raise InvalidArgumentError(
                f"inference input '{name}' data-type is '{shown(inp.datatype)}', but model "
                f"'{model}' expects '{spec.datatype}'"
            )
        shape = inp.shape
        if len(shape) != len(spec.expected) or any(shape[i] != e for i, e in spec.fixed):
            mv.stats.count_schema_skew(name, "shape")
            raise InvalidArgumentError(
                f"unexpected shape for input '{name}' for model '{model}'. Expected "
                f"{_shape_str(spec.expected)}, got {_shape_str(shape)}"
            )
        data = inp.data
        if batching:
            batch_sizes[name] = shape[0]
            if spec.reshape is not None:
                data = data.reshape((shape[0], *spec.reshape))
        elif spec.reshape is not None:
            data = data.reshape(spec.reshape)
        feeds[name] = data
    batch = 1
    if batching and batch_sizes:
        sizes = set(batch_sizes.values())
        if len(sizes) > 1:
            for n in batch_sizes:
                mv.stats.count_schema_skew(n, "shape")
            raise InvalidArgumentError(
                f"inputs of model '{model}' disagree on the batch size: "
                + ", ".join(f"'{n}' has {b}" for n, b in batch_sizes.items())
            )
        batch = sizes.pop()
        if batch < 1 or batch > sig.max_batch_size:
            raise InvalidArgumentError(
                f"inference request batch-size must be between 1 and "
                f"{sig.max_batch_size} for '{model}', got {batch}"
            )
    return feeds, batch


def output_names(mv: ModelVersion, request: InferRequest) -> list[str]:
    """The outputs a request asks for (all when it names none), checked."""
    known = signature(mv).output_names
    if not request.outputs:
        return list(known)
    if len(set(request.outputs)) != len(request.outputs):
        raise InvalidArgumentError(
            f"a request for model '{mv.name}' asks for the same output more than once"
        )
    for name in request.outputs:
        if name not in known:
            raise InvalidArgumentError(
                f"unexpected inference output '{shown(name)}' for model '{mv.name}'; it has "
                f"{', '.join(repr(n) for n in known)}"
            )
    return list(request.outputs)
