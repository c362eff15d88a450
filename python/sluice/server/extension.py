"""sluice.v1.SluiceService: rollouts (stable, canary, shadow) over gRPC."""

from __future__ import annotations

import dataclasses

import grpc

from sluice.errors import InvalidArgumentError
from sluice.proto import sluice_service_pb2 as spb
from sluice.proto import sluice_service_pb2_grpc as spb_grpc
from sluice.repository import ModelManager
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
