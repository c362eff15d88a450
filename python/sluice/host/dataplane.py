"""The protocol-neutral data plane: every KServe v2 and sluice operation.

Transports (server/) convert wire messages into the types here and back, and
map SluiceError codes to their statuses at one edge; nothing here knows gRPC,
HTTP or protobuf wire formats (mc.ModelConfig is the config's own type).
Runs on the event loop; models run on executors, and repository I/O runs on
worker threads inside the lifecycle manager.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from sluice import _core, datatypes, limits
from sluice.errors import (
    InvalidArgumentError,
    NotFoundError,
    SluiceError,
    UnavailableError,
    shown,
)
from sluice.host.lifecycle import IndexEntry, ModelManager, ModelVersion
from sluice.host.routing import Route
from sluice.host.validation import output_names as requested_outputs
from sluice.host.validation import validate_inputs
from sluice.monitoring.stats import InferStats
from sluice.proto import model_config_pb2 as mc
from sluice.repository.registry.labels import Canary, Labels, LabelsError, Shadow, read_labels
from sluice.repository.rollout import outputs_agree

Array = np.ndarray[Any, Any]

PLATFORM = "onnxruntime_onnx"
# Only what is really implemented; perf_analyzer reads "statistics" from here.
EXTENSIONS = ("model_configuration", "model_repository", "statistics", "schedule_policy")


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


@dataclasses.dataclass(frozen=True)
class ServerInfo:
    name: str
    version: str
    extensions: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class TensorMetadata:
    name: str
    datatype: str
    shape: tuple[int, ...]  # -1 for a dynamic dim (the batch dim included)


@dataclasses.dataclass(frozen=True)
class ModelMetadata:
    name: str
    versions: tuple[str, ...]
    platform: str
    inputs: tuple[TensorMetadata, ...]
    outputs: tuple[TensorMetadata, ...]


@dataclasses.dataclass(frozen=True)
class VersionStatistics:
    name: str
    version: str
    stats: InferStats


@dataclasses.dataclass(frozen=True)
class RolloutChange:
    """A SetRollout: each field None leaves that label as it is."""

    stable_version: int | None = None
    canary: Canary | None = None
    clear_canary: bool = False
    shadow: Shadow | None = None
    clear_shadow: bool = False


@dataclasses.dataclass(frozen=True)
class DriftReport:
    model_name: str
    version: int
    available: bool
    reason: str
    schema_skew: tuple[tuple[str, str, int], ...]  # (input, kind, count)
    window_seconds: float = 0.0
    inputs: dict[str, Any] | None = None  # monitoring.drift report parts
    outputs: dict[str, Any] | None = None
    quality: dict[str, Any] | None = None


@dataclasses.dataclass(frozen=True)
class FeedbackLabel:
    request_id: str
    values: tuple[float, ...]


@dataclasses.dataclass(frozen=True)
class FeedbackResult:
    matched: int
    unknown: int
    quality: dict[str, Any] | None


def _int_param(request: InferRequest, key: str) -> int:
    # Range-checked at the edge: the core's types cannot hold every int a client sends.
    return limits.int_parameter(request.parameters, key, request.model_name)


def _shape_key(feeds: Mapping[str, np.ndarray[Any, Any]]) -> int:
    """Requests batch together only when every input's non-batch dims match."""
    return hash(tuple((name, arr.shape[1:]) for name, arr in feeds.items()))


def _tensor_metadata(t: Any, max_batch_size: int) -> TensorMetadata:
    shape = ([-1] if max_batch_size > 0 else []) + list(t.dims)
    return TensorMetadata(t.name, datatypes.wire_name(t.data_type), tuple(shape))


# Background mirror requests (shadow and canary comparisons) beyond this many in
# flight are skipped, so a slow shadow can never build an unbounded backlog.
MAX_MIRRORS_IN_FLIGHT = 64


class DataPlane:
    """Every operation of the server, whatever the transport. Raises SluiceError
    (neutral codes) for anything a client should be told."""

    def __init__(
        self,
        models: ModelManager,
        *,
        server_name: str,
        server_version: str,
        is_ready: Callable[[], bool],
        explicit_control: bool = False,
    ) -> None:
        self.models = models
        self._mirrors: set[asyncio.Task[None]] = set()
        self._info = ServerInfo(server_name, server_version, EXTENSIONS)
        self._is_ready = is_ready
        self._explicit = explicit_control

    # ---- health and metadata -------------------------------------------------

    def server_live(self) -> bool:
        return True

    def server_ready(self) -> bool:
        return self._is_ready()

    def server_metadata(self) -> ServerInfo:
        return self._info

    def model_ready(self, name: str, version: str) -> bool:
        try:
            return self.models.resolve(name, version).serving
        except SluiceError:
            return False

    def model_metadata(self, name: str, version: str) -> ModelMetadata:
        mv = self.models.resolve(name, version)
        model = self.models.model(mv.name)
        mbs = mv.config.max_batch_size
        return ModelMetadata(
            mv.name,
            tuple(str(v.version) for v in model.ready_versions()),
            PLATFORM,
            tuple(_tensor_metadata(t, mbs) for t in mv.config.input),
            tuple(_tensor_metadata(t, mbs) for t in mv.config.output),
        )

    def model_config(self, name: str, version: str) -> mc.ModelConfig:
        return self.models.resolve(name, version).config

    def model_statistics(self, name: str, version: str) -> list[VersionStatistics]:
        if name:
            model = self.models.model(name)
            versions = list(model.versions.values())
            if version:
                versions = [self.models.resolve(name, version)]
        else:
            versions = [v for m in self.models.models.values() for v in m.versions.values()]
        versions = [v for v in versions if v.ready]
        if name and not versions:
            raise NotFoundError(f"requested model '{shown(name)}' is not available")
        return [VersionStatistics(v.name, str(v.version), v.stats) for v in versions]

    # ---- repository (Triton's model_repository extension) ----------------------

    async def repository_index(self, ready_only: bool = False) -> list[IndexEntry]:
        entries = await self.models.index()
        return [e for e in entries if e.state == "READY"] if ready_only else entries

    def _require_explicit(self) -> None:
        if not self._explicit:
            raise UnavailableError(
                "explicit model load / unload is not allowed unless the server runs with "
                "--model-control-mode explicit"
            )

    async def load_model(self, name: str, config_override: mc.ModelConfig | None) -> None:
        self._require_explicit()
        await self.models.load(name, config_override)

    async def unload_model(self, name: str) -> None:
        self._require_explicit()
        await self.models.unload(name)

    # ---- rollouts ----------------------------------------------------------------

    async def get_rollout(self, name: str) -> Labels:
        model = self.models.model(name)
        return await asyncio.to_thread(read_labels, model.directory)

    async def set_rollout(self, name: str, change: RolloutChange) -> Labels:
        def apply(current: Labels) -> Labels:
            updated = current
            try:
                if change.stable_version:
                    updated = dataclasses.replace(updated, stable=change.stable_version)
                if change.clear_canary:
                    updated = dataclasses.replace(updated, canary=None)
                elif change.canary is not None:
                    updated = dataclasses.replace(updated, canary=change.canary)
                if change.clear_shadow:
                    updated = dataclasses.replace(updated, shadow=None)
                elif change.shadow is not None:
                    updated = dataclasses.replace(updated, shadow=change.shadow)
            except LabelsError as exc:
                raise InvalidArgumentError(f"rollout for '{shown(name)}': {exc}") from None
            return updated

        return await self.models.change_labels(name, apply)

    # ---- drift and feedback ------------------------------------------------------

    def drift_report(self, name: str, version: int) -> DriftReport:
        mv = self.models.resolve(name, str(version) if version else "")
        skew = tuple((i, k, n) for (i, k), n in sorted(mv.stats.schema_skew.items()))
        monitor = mv.drift
        if monitor is None:
            return DriftReport(mv.name, mv.version, False, mv.drift_reason, skew)
        report = monitor.report()
        return DriftReport(
            mv.name,
            mv.version,
            True,
            "",
            skew,
            monitor.window_seconds,
            report["inputs"],
            report["outputs"],
            report["quality"],
        )

    def feedback(self, name: str, version: int, labels: Sequence[FeedbackLabel]) -> FeedbackResult:
        model = self.models.model(name)
        if version:
            mv = model.versions.get(version)
            if mv is None:
                raise NotFoundError(f"model '{shown(name)}' has no loaded version {version}")
            monitors = [mv.drift] if mv.drift is not None else []
        else:
            monitors = [v.drift for _, v in sorted(model.versions.items()) if v.drift is not None]
        matched = unknown = 0
        last = monitors[-1] if monitors else None
        for label in labels:
            hit = [m for m in monitors if m.feedback(label.request_id, list(label.values))]
            if hit:
                matched += 1
                last = hit[-1]
            else:
                unknown += 1
        return FeedbackResult(matched, unknown, last.quality_report() if last else None)

    # ---- inference -----------------------------------------------------------

    async def infer(self, request: InferRequest) -> InferResponse:
        route = self.models.route(request.model_name, request.model_version, request.id)
        try:
            return await self._infer(route, request)
        finally:
            route.release()

    async def _infer(self, route: Route, request: InferRequest) -> InferResponse:
        mv = route.primary
        canary = route.compare_with is not None
        started = time.perf_counter()
        try:
            outputs = await self._run(mv, request)
        except SluiceError:
            if canary:  # the canary's errors and successes count on the same basis
                self._canary_outcome(mv, False, time.perf_counter() - started)
            raise
        latency_s = time.perf_counter() - started
        if canary:
            self._canary_outcome(mv, True, latency_s)
        elif route.stable_in_split:
            model = self.models.models.get(mv.name)
            if model is not None:
                self.models.router.stable_outcome(model, latency_s)
        if mv.drift is not None and request.id:  # for Feedback (concept drift)
            mv.drift.remember(request.id, outputs)
        stable_outputs: asyncio.Future[dict[str, Array] | None] | None = None
        if route.compare_with is not None:
            stable_outputs = self._mirror(request, route.compare_with, outputs, canary=mv)
        if route.shadow is not None:
            # A shadow is compared with stable's own answer, never with a canary's.
            self._mirror(request, route.shadow, outputs, canary=None, reference=stable_outputs)
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
        # --max-inflight-per-model counts every version of the model together.
        owner = self.models.models.get(mv.name)
        mv.stats.inflight += 1
        if owner is not None:
            owner.inflight += 1
        try:
            inflight = owner.inflight if owner is not None else mv.stats.inflight
            limits.current().check_inflight(inflight - 1, mv.name)
            feeds, rows = validate_inputs(mv, request)
            output_names = requested_outputs(mv, request)
            scheduler = mv.scheduler
            assert scheduler is not None  # set before the version turns READY
            if not scheduler.executor.available:
                raise UnavailableError(
                    f"model '{mv.name}' version {mv.version}: no executor instance is running "
                    "(restarting; see the server log)"
                )
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
            if owner is not None:
                owner.inflight -= 1
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

    def _canary_outcome(self, mv: ModelVersion, ok: bool, latency_s: float) -> None:
        model = self.models.models.get(mv.name)
        if model is not None:
            self.models.router.canary_outcome(model, mv, ok, latency_s)

    def _mirror(
        self,
        request: InferRequest,
        target: ModelVersion,
        primary_outputs: dict[str, Array],
        canary: ModelVersion | None,
        reference: asyncio.Future[dict[str, Array] | None] | None = None,
    ) -> asyncio.Future[dict[str, Array] | None] | None:
        """Runs `request` on `target` in the background and compares outputs;
        the client's response never waits for it or depends on it. Mirrors are
        skipped, counted, when too many are already in flight. Returns a future
        of the mirror's outputs (None when it failed), or None when skipped.

        canary set: `target` is stable, compared with the canary's answer.
        canary None: `target` is a shadow, compared with stable's answer
        (`reference` when the request went to a canary, else the primary's)."""
        if len(self._mirrors) >= MAX_MIRRORS_IN_FLIGHT:
            if canary is None:
                target.stats.count_shadow("skipped")
            return None
        mirrored = dataclasses.replace(request, received_ns=0, deadline_ns=0)
        loop = asyncio.get_running_loop()
        result: asyncio.Future[dict[str, Array] | None] = loop.create_future()
        target.acquire()

        async def run() -> None:
            try:
                outputs: dict[str, Array] | None = await self._run(target, mirrored)
            except SluiceError:
                outputs = None
            finally:
                target.release()
            result.set_result(outputs)
            if canary is None:  # a shadow: record agreement with stable, discard the response
                expected: dict[str, Array] | None = primary_outputs
                if reference is not None:
                    expected = await reference
                if outputs is None:
                    target.stats.count_shadow("error")
                elif expected is None:
                    target.stats.count_shadow("skipped")  # nothing of stable's to compare with
                else:
                    same = outputs_agree(expected, outputs, self.models.guard_limits)
                    target.stats.count_shadow("agree" if same else "disagree")
                return
            # A mirror that failed compares nothing (it says nothing about the canary).
            model = self.models.models.get(canary.name)
            if outputs is not None and model is not None:
                agrees = outputs_agree(primary_outputs, outputs, self.models.guard_limits)
                self.models.router.canary_comparison(model, canary, agrees)

        task = loop.create_task(run())
        self._mirrors.add(task)
        task.add_done_callback(self._mirrors.discard)
        return result

    def record_rejected(
        self, model_name: str, model_version: str, received_ns: int, error: BaseException
    ) -> None:
        """Counts a request that failed before reaching the data plane (undecodable)."""
        try:
            mv = self.models.resolve(model_name, model_version)
        except SluiceError:
            return
        mv.stats.record_failure(_core.monotonic_ns() - received_ns, error)
