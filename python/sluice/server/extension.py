"""sluice.v1.SluiceService: rollouts (stable, canary, shadow) and drift
monitoring (DriftReport, Feedback) over gRPC."""

from __future__ import annotations

from typing import Any

import grpc

from sluice.errors import InvalidArgumentError, shown
from sluice.host.dataplane import (
    DataPlane,
    DriftReport,
    FeedbackLabel,
    FeedbackResult,
    RolloutChange,
)
from sluice.proto import sluice_service_pb2 as spb
from sluice.proto import sluice_service_pb2_grpc as spb_grpc
from sluice.repository.registry.labels import Canary, Labels, LabelsError, Shadow


def rollout_message(name: str, labels: Labels) -> spb.Rollout:
    out = spb.Rollout(model_name=name, stable_version=labels.stable or 0)
    if labels.canary is not None:
        c = labels.canary
        out.canary.CopyFrom(spb.Canary(version=c.version, weight=c.weight, sticky=c.sticky))
    if labels.shadow is not None:
        out.shadow.CopyFrom(spb.Shadow(version=labels.shadow.version, sample=labels.shadow.sample))
    for e in labels.history:
        out.history.add(label=e.label, version=e.version, at=e.at, action=e.action, detail=e.detail)
    return out


_TEXT_KEYS = {"name", "kind", "verdict", "skew", "edges", "codes"}
_COUNT_KEYS = {"reference_counts", "window_counts"}


def _tensor_drift(part: dict[str, Any]) -> spb.TensorDrift:
    out = spb.TensorDrift(
        rows=part["rows"],
        evaluated=part["evaluated"],
        drifted=part["drifted"],
        drift_share=part["drift_share"] or 0.0,
        dataset=part["dataset"],
    )
    for f in part["features"]:
        fd = out.features.add(name=f["name"], kind=f["kind"], verdict=f["verdict"])
        fd.skew.extend(f.get("skew") or [])
        fd.edges.extend(f.get("edges") or [])
        fd.codes.extend(f.get("codes") or [])
        fd.reference_counts.extend(f.get("reference_counts") or [])
        fd.window_counts.extend(f.get("window_counts") or [])
        for key, value in f.items():
            if key in _TEXT_KEYS or key in _COUNT_KEYS or value is None:
                continue
            if isinstance(value, int | float) and not isinstance(value, bool):
                fd.statistics[key] = float(value)
    return out


def _quality(q: dict[str, Any]) -> spb.ModelQuality:
    out = spb.ModelQuality(available=q["available"], reason=q.get("reason", ""))
    if q["available"]:
        out.task = q["task"]
        out.labelled = q["labelled"]
        out.degraded = q["degraded"]
        out.metrics.update(q["metrics"])
        out.baseline.update(q["baseline"])
    return out


def drift_report(r: DriftReport) -> spb.DriftReportResponse:
    out = spb.DriftReportResponse(model_name=r.model_name, version=r.version)
    for input_name, kind, n in r.schema_skew:
        out.schema_skew.add(input=input_name, kind=kind, count=n)
    out.available = r.available
    if not r.available:
        out.reason = r.reason
        return out
    out.window_seconds = r.window_seconds
    if r.inputs is not None:
        out.inputs.CopyFrom(_tensor_drift(r.inputs))
    if r.outputs is not None:
        out.outputs.CopyFrom(_tensor_drift(r.outputs))
    if r.quality is not None:
        out.quality.CopyFrom(_quality(r.quality))
    return out


def rollout_change(request: spb.SetRolloutRequest) -> RolloutChange:
    """The data plane's form of a SetRollout request (shared by gRPC and REST)."""
    try:
        return RolloutChange(
            stable_version=request.stable_version or None,
            canary=Canary(request.canary.version, request.canary.weight, request.canary.sticky)
            if request.HasField("canary")
            else None,
            clear_canary=request.clear_canary,
            shadow=Shadow(request.shadow.version, request.shadow.sample)
            if request.HasField("shadow")
            else None,
            clear_shadow=request.clear_shadow,
        )
    except LabelsError as exc:
        raise InvalidArgumentError(f"rollout for '{shown(request.model_name)}': {exc}") from None


def feedback_message(result: FeedbackResult) -> spb.FeedbackResponse:
    out = spb.FeedbackResponse(matched=result.matched, unknown=result.unknown)
    if result.quality is not None:
        out.quality.CopyFrom(_quality(result.quality))
    return out


class SluiceServicer(spb_grpc.SluiceServiceServicer):
    """Thin: decode -> DataPlane -> encode; errors leave through server/edge.py."""

    def __init__(self, dataplane: DataPlane) -> None:
        self._dp = dataplane

    async def GetRollout(
        self, request: spb.GetRolloutRequest, context: grpc.aio.ServicerContext
    ) -> spb.Rollout:
        labels = await self._dp.get_rollout(request.model_name)
        return rollout_message(request.model_name, labels)

    async def SetRollout(
        self, request: spb.SetRolloutRequest, context: grpc.aio.ServicerContext
    ) -> spb.Rollout:
        labels = await self._dp.set_rollout(request.model_name, rollout_change(request))
        return rollout_message(request.model_name, labels)

    async def DriftReport(
        self, request: spb.DriftReportRequest, context: grpc.aio.ServicerContext
    ) -> spb.DriftReportResponse:
        return drift_report(self._dp.drift_report(request.model_name, request.version))

    async def Feedback(
        self, request: spb.FeedbackRequest, context: grpc.aio.ServicerContext
    ) -> spb.FeedbackResponse:
        labels = [FeedbackLabel(x.request_id, tuple(x.values)) for x in request.labels]
        return feedback_message(self._dp.feedback(request.model_name, request.version, labels))
