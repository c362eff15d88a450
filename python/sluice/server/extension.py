"""sluice.v1.SluiceService: rollouts (stable, canary, shadow) and drift
monitoring (DriftReport, Feedback) over gRPC."""

from __future__ import annotations

import dataclasses
from typing import Any

import grpc

from sluice.errors import InvalidArgumentError, NotFoundError
from sluice.monitoring.drift import DriftMonitor
from sluice.proto import sluice_service_pb2 as spb
from sluice.proto import sluice_service_pb2_grpc as spb_grpc
from sluice.repository import ModelManager, ModelVersion
from sluice.repository.registry import Canary, Labels, LabelsError, Shadow, read_labels
from sluice.server.inference import _abort


def _rollout(name: str, labels: Labels) -> spb.Rollout:
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


def drift_report(mv: ModelVersion) -> spb.DriftReportResponse:
    out = spb.DriftReportResponse(model_name=mv.name, version=mv.version)
    for (input_name, kind), n in sorted(mv.stats.schema_skew.items()):
        out.schema_skew.add(input=input_name, kind=kind, count=n)
    monitor = mv.drift
    if monitor is None:
        out.available = False
        out.reason = mv.drift_reason
        return out
    report = monitor.report()
    out.available = True
    out.window_seconds = monitor.window_seconds
    if report["inputs"] is not None:
        out.inputs.CopyFrom(_tensor_drift(report["inputs"]))
    if report["outputs"] is not None:
        out.outputs.CopyFrom(_tensor_drift(report["outputs"]))
    out.quality.CopyFrom(_quality(report["quality"]))
    return out


class SluiceServicer(spb_grpc.SluiceServiceServicer):
    def __init__(self, models: ModelManager) -> None:
        self._models = models

    async def GetRollout(
        self, request: spb.GetRolloutRequest, context: grpc.aio.ServicerContext
    ) -> spb.Rollout:
        try:
            model = self._models.model(request.model_name)
            labels = read_labels(model.directory)
        except Exception as exc:
            await _abort(context, exc)
        return _rollout(request.model_name, labels)

    async def SetRollout(
        self, request: spb.SetRolloutRequest, context: grpc.aio.ServicerContext
    ) -> spb.Rollout:
        def change(current: Labels) -> Labels:
            updated = current
            try:
                if request.stable_version:
                    updated = dataclasses.replace(updated, stable=request.stable_version)
                if request.clear_canary:
                    updated = dataclasses.replace(updated, canary=None)
                elif request.HasField("canary"):
                    c = request.canary
                    canary = Canary(c.version, c.weight, c.sticky)
                    updated = dataclasses.replace(updated, canary=canary)
                if request.clear_shadow:
                    updated = dataclasses.replace(updated, shadow=None)
                elif request.HasField("shadow"):
                    shadow = Shadow(request.shadow.version, request.shadow.sample)
                    updated = dataclasses.replace(updated, shadow=shadow)
            except LabelsError as exc:
                raise InvalidArgumentError(f"rollout for '{request.model_name}': {exc}") from None
            return updated

        try:
            labels = await self._models.change_labels(request.model_name, change)
        except Exception as exc:
            await _abort(context, exc)
        return _rollout(request.model_name, labels)

    def _version(self, name: str, version: int) -> ModelVersion:
        return self._models.resolve(name, str(version) if version else "")

    async def DriftReport(
        self, request: spb.DriftReportRequest, context: grpc.aio.ServicerContext
    ) -> spb.DriftReportResponse:
        try:
            mv = self._version(request.model_name, request.version)
            return drift_report(mv)
        except Exception as exc:
            await _abort(context, exc)

    async def Feedback(
        self, request: spb.FeedbackRequest, context: grpc.aio.ServicerContext
    ) -> spb.FeedbackResponse:
        try:
            model = self._models.model(request.model_name)
            if request.version:
                mv = model.versions.get(request.version)
                if mv is None:
                    raise NotFoundError(
                        f"model '{request.model_name}' has no loaded version {request.version}"
                    )
                monitors = [mv.drift] if mv.drift is not None else []
            else:
                monitors = [
                    v.drift for _, v in sorted(model.versions.items()) if v.drift is not None
                ]
            matched = unknown = 0
            last: DriftMonitor | None = monitors[-1] if monitors else None
            for label in request.labels:
                hit = [m for m in monitors if m.feedback(label.request_id, list(label.values))]
                if hit:
                    matched += 1
                    last = hit[-1]
                else:
                    unknown += 1
            out = spb.FeedbackResponse(matched=matched, unknown=unknown)
            if last is not None:
                out.quality.CopyFrom(_quality(last.quality_report()))
            return out
        except Exception as exc:
            await _abort(context, exc)
