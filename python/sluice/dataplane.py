"""The protocol-neutral data plane: validate a decoded request against the model
signature, route it to a version, run it, and return named outputs.

Transports (server/) convert wire messages to InferRequest and InferResponse
back; nothing here knows gRPC or protobuf. Runs on the event loop; model
execution happens on the version's worker threads.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from sluice import _core, datatypes, limits
from sluice.errors import InvalidArgumentError, SluiceError
from sluice.proto import model_config_pb2 as mc
from sluice.repository import ModelManager, ModelVersion
from sluice.repository.rollout import Outcome, outputs_agree

Array = np.ndarray[Any, Any]


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
    deadline_ns: int = 0  # time left before the client's deadline; 0 = none


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


def _int_param(request: InferRequest, key: str) -> int:
    # Range-checked at the edge: the core's types cannot hold every int a client sends.
    return limits.int_parameter(request.parameters, key, request.model_name)


def _shape_key(feeds: Mapping[str, np.ndarray[Any, Any]]) -> int:
    """Requests batch together only when every input's non-batch dims match."""
    return hash(tuple((name, arr.shape[1:]) for name, arr in feeds.items()))


def _shape_str(shape: Sequence[int]) -> str:
    return "[" + ",".join(str(d) for d in shape) + "]"


# Background mirror requests (shadow and canary comparisons) beyond this many in
# flight are skipped, so a slow shadow can never build an unbounded backlog.
MAX_MIRRORS_IN_FLIGHT = 64


class DataPlane:
    def __init__(self, models: ModelManager) -> None:
        self.models = models
        self._mirrors: set[asyncio.Task[None]] = set()

    async def infer(self, request: InferRequest) -> InferResponse:
        route = self.models.route(request.model_name, request.model_version, request.id)
        mv = route.primary
        started = time.perf_counter()
        try:
            outputs = await self._run(mv, request)
        except SluiceError:
            if route.compare_with is not None:  # a canary request that failed
                self.models.record_canary(mv, Outcome(False, 0.0, None), None)
            raise
        latency_s = time.perf_counter() - started
        if mv.drift is not None and request.id:  # for Feedback (concept drift)
            mv.drift.remember(request.id, outputs)
        if route.compare_with is not None:
            self._mirror(request, route.compare_with, outputs, canary=(mv, latency_s))
        if route.shadow is not None:
            self._mirror(request, route.shadow, outputs, canary=None)
        return InferResponse(
            mv.name,
            str(mv.version),
            request.id,
            [
                InferOutput(name, datatypes.from_numpy(arr.dtype).wire, tuple(arr.shape), arr)
                for name, arr in outputs.items()
            ],
        )

    async def _run(self, mv: ModelVersion, request: InferRequest) -> dict[str, Array]:
        """Validates `request` against `mv`'s signature and runs it there; returns
        the requested outputs by name. Counts the outcome in `mv`'s statistics."""
        submitted = _core.monotonic_ns()
        received = request.received_ns or submitted
        mv.stats.inflight += 1
        try:
            limits.current().check_inflight(mv.stats.inflight - 1, mv.name)
            feeds, rows = self._validate_inputs(mv, request)
            output_names = self._output_names(mv, request)
            scheduler = mv.scheduler
            assert scheduler is not None  # set before the version turns READY
            result = await scheduler.submit(
                feeds,
                rows,
                _shape_key(feeds),
                priority=_int_param(request, "priority"),
                timeout_ns=_int_param(request, "timeout") * 1_000,  # Triton sends microseconds
                deadline_ns=request.deadline_ns,
            )
        except (SluiceError, asyncio.CancelledError) as exc:
            mv.stats.record_failure(_core.monotonic_ns() - received, exc)
            raise
        finally:
            mv.stats.inflight -= 1
        # As Triton's: the phases cover the scheduler and the model; the hop back
        # to the loop is in request_ns only (perf_analyzer shows it as overhead).
        mv.stats.record_request(
            request_ns=_core.monotonic_ns() - received,
            queue_ns=result.queue_ns,
            compute_input_ns=result.compute_input_ns,
            compute_infer_ns=result.compute_infer_ns,
            compute_output_ns=result.compute_output_ns,
        )
        return {name: result.outputs[name] for name in output_names}

    def _mirror(
        self,
        request: InferRequest,
        target: ModelVersion,
        primary_outputs: dict[str, Array],
        canary: tuple[ModelVersion, float] | None,
    ) -> None:
        """Runs `request` on `target` in the background and compares outputs;
        the client's response never waits for it or depends on it. Shadow
        mirrors are dropped, counted, when too many are already in flight."""
        if len(self._mirrors) >= MAX_MIRRORS_IN_FLIGHT:
            target.stats.count_shadow("skipped")
            return
        mirrored = dataclasses.replace(request, received_ns=0, deadline_ns=0)

        async def run() -> None:
            started = time.perf_counter()
            try:
                outputs = await self._run(target, mirrored)
            except SluiceError:
                outputs = None
            latency_s = time.perf_counter() - started
            # A mirror that failed compares nothing (it says nothing about the canary).
            agrees = (
                None
                if outputs is None
                else outputs_agree(primary_outputs, outputs, self.models.guard_limits)
            )
            if canary is None:  # a shadow: record agreement, discard the response
                target.stats.count_shadow(
                    "error" if outputs is None else "agree" if agrees else "disagree"
                )
                return
            canary_mv, canary_latency_s = canary
            stable_latency = latency_s if outputs is not None else None
            self.models.record_canary(
                canary_mv, Outcome(True, canary_latency_s, agrees), stable_latency
            )

        task = asyncio.get_running_loop().create_task(run())
        self._mirrors.add(task)
        task.add_done_callback(self._mirrors.discard)

    def record_rejected(
        self, model_name: str, model_version: str, received_ns: int, error: BaseException
    ) -> None:
        """Counts a request that failed before reaching the data plane (undecodable)."""
        try:
            mv = self.models.resolve(model_name, model_version)
        except SluiceError:
            return
        mv.stats.record_failure(_core.monotonic_ns() - received_ns, error)

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
                # Not the client's name: labels must not grow with what clients send.
                mv.stats.count_schema_skew("(unknown)", "name")
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
            for m in missing:
                mv.stats.count_schema_skew(m, "name")
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
                mv.stats.count_schema_skew(name, "datatype")
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
                mv.stats.count_schema_skew(name, "shape")
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
                for n in batch_sizes:
                    mv.stats.count_schema_skew(n, "shape")
                raise InvalidArgumentError(
                    f"inputs of model '{model}' disagree on the batch size: "
                    + ", ".join(f"'{n}' has {b}" for n, b in batch_sizes.items())
                )
            batch = sizes.pop()
            if batch < 1 or batch > config.max_batch_size:
                raise InvalidArgumentError(
                    f"inference request batch-size must be between 1 and "
                    f"{config.max_batch_size} for '{model}', got {batch}"
                )
        return feeds, batch

    @staticmethod
    def _output_names(mv: ModelVersion, request: InferRequest) -> list[str]:
        known = [o.name for o in mv.config.output]
        if not request.outputs:
            return known
        if len(set(request.outputs)) != len(request.outputs):
            raise InvalidArgumentError(
                f"a request for model '{mv.name}' asks for the same output more than once"
            )
        for name in request.outputs:
            if name not in known:
                raise InvalidArgumentError(
                    f"unexpected inference output '{name}' for model '{mv.name}'; it has "
                    f"{', '.join(repr(n) for n in known)}"
                )
        return list(request.outputs)
