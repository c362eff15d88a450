"""The protocol-neutral data plane: validate a decoded request against the model
signature, route it to a version, run it, and return named outputs.

Transports (server/) convert wire messages to InferRequest and InferResponse
back; nothing here knows gRPC or protobuf. Runs on the event loop; model
execution happens on the version's worker threads.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from sluice import _core, datatypes
from sluice.errors import InternalError, InvalidArgumentError
from sluice.proto import model_config_pb2 as mc
from sluice.repository import ModelManager, ModelVersion


@dataclasses.dataclass
class InferInput:
    name: str
    datatype: str  # KServe v2 wire name
    shape: tuple[int, ...]
    data: np.ndarray[Any, Any]  # already of `datatype` and `shape`


@dataclasses.dataclass
class InferRequest:
    model_name: str
    model_version: str  # "" = policy default
    id: str
    inputs: list[InferInput]
    outputs: list[str]  # requested output names; empty = all
    parameters: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    received_ns: int = 0  # core monotonic clock, when the transport got it


@dataclasses.dataclass
class InferOutput:
    name: str
    datatype: str
    shape: tuple[int, ...]
    data: np.ndarray[Any, Any]


@dataclasses.dataclass
class InferResponse:
    model_name: str
    model_version: str
    id: str
    outputs: list[InferOutput]


def _shape_str(shape: Sequence[int]) -> str:
    return "[" + ",".join(str(d) for d in shape) + "]"


class DataPlane:
    def __init__(self, models: ModelManager) -> None:
        self.models = models

    async def infer(self, request: InferRequest) -> InferResponse:
        mv = self.models.resolve(request.model_name, request.model_version)
        feeds, batch = self._validate_inputs(mv, request)
        output_names = self._output_names(mv, request)
        runtime, executor = mv.runtime, mv.executor
        assert runtime is not None
        assert executor is not None
        loop = asyncio.get_running_loop()
        submitted_ns = _core.monotonic_ns()
        timing: dict[str, int] = {}

        def run() -> list[np.ndarray[Any, Any]]:
            timing["start"] = _core.monotonic_ns()
            try:
                return runtime.run(feeds, output_names)
            finally:
                timing["end"] = _core.monotonic_ns()

        try:
            results = await loop.run_in_executor(executor, run)
        except Exception as exc:
            mv.stats.record_failure(_core.monotonic_ns() - (request.received_ns or submitted_ns))
            raise InternalError(
                f"onnxruntime failed to run model '{mv.name}' version {mv.version}: {exc}"
            ) from exc
        outputs = [
            InferOutput(name, datatypes.from_numpy(arr.dtype).wire, tuple(arr.shape), arr)
            for name, arr in zip(output_names, results, strict=True)
        ]
        done_ns = _core.monotonic_ns()
        received = request.received_ns or submitted_ns
        mv.stats.record_success(
            batch_size=batch,
            request_ns=done_ns - received,
            queue_ns=timing["start"] - submitted_ns,
            compute_input_ns=submitted_ns - received,
            compute_infer_ns=timing["end"] - timing["start"],
            compute_output_ns=done_ns - timing["end"],
        )
        return InferResponse(mv.name, str(mv.version), request.id, outputs)

    def record_rejected(self, model_name: str, model_version: str, received_ns: int) -> None:
        """Counts a request that failed before it ran (bad input) against its version."""
        try:
            mv = self.models.resolve(model_name, model_version)
        except Exception:
            return
        mv.stats.record_failure(_core.monotonic_ns() - received_ns)

    # ---- validation ------------------------------------------------------------

    def _validate_inputs(
        self, mv: ModelVersion, request: InferRequest
    ) -> tuple[dict[str, np.ndarray[Any, Any]], int]:
        config = mv.config
        model = mv.name
        declared = {t.name: t for t in config.input}
        given: dict[str, InferInput] = {}
        for inp in request.inputs:
            if inp.name not in declared:
                raise InvalidArgumentError(
                    f"unexpected inference input '{inp.name}' for model '{model}'; it expects "
                    f"{', '.join(repr(n) for n in declared)}"
                )
            if inp.name in given:
                raise InvalidArgumentError(
                    f"input '{inp.name}' appears twice in the request for model '{model}'"
                )
            given[inp.name] = inp
        missing = [n for n, t in declared.items() if n not in given and not t.optional]
        if missing:
            raise InvalidArgumentError(
                f"expected {len(declared)} inputs but got {len(given)} inputs for model "
                f"'{model}'; missing required input(s) {', '.join(repr(m) for m in missing)}"
            )
        batch = 1
        feeds: dict[str, np.ndarray[Any, Any]] = {}
        batch_sizes: dict[str, int] = {}
        for name, inp in given.items():
            t = declared[name]
            want = datatypes.BY_CONFIG[mc.DataType.Name(t.data_type)].wire
            if inp.datatype != want:
                raise InvalidArgumentError(
                    f"inference input '{name}' data-type is '{inp.datatype}', but model "
                    f"'{model}' expects '{want}'"
                )
            dims = list(t.dims)
            expected = ([-1] if config.max_batch_size > 0 else []) + dims
            shape = inp.shape
            if len(shape) != len(expected) or any(
                e != -1 and s != e for s, e in zip(shape, expected, strict=True)
            ):
                raise InvalidArgumentError(
                    f"unexpected shape for input '{name}' for model '{model}'. Expected "
                    f"{_shape_str(expected)}, got {_shape_str(shape)}"
                )
            data = inp.data
            if config.max_batch_size > 0:
                batch_sizes[name] = shape[0]
                if t.HasField("reshape"):
                    data = data.reshape((shape[0], *t.reshape.shape))
            elif t.HasField("reshape"):
                data = data.reshape(tuple(t.reshape.shape))
            feeds[name] = data
        if config.max_batch_size > 0 and batch_sizes:
            sizes = set(batch_sizes.values())
            if len(sizes) > 1:
                raise InvalidArgumentError(
                    f"inputs of model '{model}' disagree on the batch size: "
                    + ", ".join(f"'{n}' has {b}" for n, b in batch_sizes.items())
                )
            batch = sizes.pop()
            if batch < 1 or batch > config.max_batch_size:
                raise InvalidArgumentError(
                    f"inference request batch-size must be <= {config.max_batch_size} for "
                    f"'{model}', got {batch}"
                )
        return feeds, batch

    @staticmethod
    def _output_names(mv: ModelVersion, request: InferRequest) -> list[str]:
        known = [o.name for o in mv.config.output]
        if not request.outputs:
            return known
        for name in request.outputs:
            if name not in known:
                raise InvalidArgumentError(
                    f"unexpected inference output '{name}' for model '{mv.name}'; it has "
                    f"{', '.join(repr(n) for n in known)}"
                )
        return list(request.outputs)
