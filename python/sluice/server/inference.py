"""GRPCInferenceService (KServe v2 + Triton's extensions) over the data plane.

Thin by design: decode -> DataPlane -> encode. Errors leave through the one
edge (server/edge.py), which every method here relies on.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
from google.protobuf import json_format

from sluice import _core
from sluice.errors import InvalidArgumentError, SluiceError, shown
from sluice.host.dataplane import DataPlane, InferResponse, TensorMetadata
from sluice.monitoring.stats import Duration, InferStats
from sluice.proto import grpc_service_pb2 as pb
from sluice.proto import grpc_service_pb2_grpc as pb_grpc
from sluice.proto import model_config_pb2 as mc
from sluice.server import codec, wire
from sluice.server.edge import Undecodable, error_text
from sluice.server.streaming import stream_replies, wants_request_order


def _tensor_metadata(t: TensorMetadata) -> pb.ModelMetadataResponse.TensorMetadata:
    return pb.ModelMetadataResponse.TensorMetadata(
        name=t.name, datatype=t.datatype, shape=list(t.shape)
    )


def config_override(model_name: str, parameters: dict[str, str]) -> mc.ModelConfig | None:
    """Triton's load parameters: "config" holds a JSON ModelConfig that replaces
    the config file for this load. Model-file overrides ("file:...") are refused."""
    override = None
    for key, text in parameters.items():
        if key == "config":
            override = mc.ModelConfig()
            try:
                json_format.Parse(text, override)
            except json_format.ParseError as exc:
                raise InvalidArgumentError(
                    f"the config override for model '{shown(model_name)}' is not a valid "
                    f"JSON ModelConfig: {shown(str(exc), 160)}"
                ) from None
        elif key.startswith("file:"):
            raise InvalidArgumentError(
                "model file overrides in load parameters are not supported; publish the "
                "version into the repository instead"
            )
    return override


def _duration(d: Duration) -> pb.StatisticDuration:
    return pb.StatisticDuration(count=d.count, ns=d.ns)


def statistics_message(name: str, version: str, s: InferStats) -> pb.ModelStatistics:
    out = pb.ModelStatistics(
        name=name,
        version=version,
        last_inference=s.last_inference_ms,
        inference_count=s.inference_count,
        execution_count=s.execution_count,
    )
    out.inference_stats.success.CopyFrom(_duration(s.success))
    out.inference_stats.fail.CopyFrom(_duration(s.fail))
    out.inference_stats.queue.CopyFrom(_duration(s.queue))
    out.inference_stats.compute_input.CopyFrom(_duration(s.compute_input))
    out.inference_stats.compute_infer.CopyFrom(_duration(s.compute_infer))
    out.inference_stats.compute_output.CopyFrom(_duration(s.compute_output))
    for size, b in sorted(s.batch_stats.items()):
        out.batch_stats.add(
            batch_size=size,
            compute_input=_duration(b.compute_input),
            compute_infer=_duration(b.compute_infer),
            compute_output=_duration(b.compute_output),
        )
    return out


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, dataplane: DataPlane) -> None:
        self._dp = dataplane

    # ---- health and metadata -------------------------------------------------

    async def ServerLive(
        self, request: pb.ServerLiveRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=self._dp.server_live())

    async def ServerReady(
        self, request: pb.ServerReadyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self._dp.server_ready())

    async def ModelReady(
        self, request: pb.ModelReadyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelReadyResponse:
        return pb.ModelReadyResponse(ready=self._dp.model_ready(request.name, request.version))

    async def ServerMetadata(
        self, request: pb.ServerMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerMetadataResponse:
        info = self._dp.server_metadata()
        return pb.ServerMetadataResponse(
            name=info.name, version=info.version, extensions=list(info.extensions)
        )

    async def ModelMetadata(
        self, request: pb.ModelMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelMetadataResponse:
        m = self._dp.model_metadata(request.name, request.version)
        return pb.ModelMetadataResponse(
            name=m.name,
            versions=list(m.versions),
            platform=m.platform,
            inputs=[_tensor_metadata(t) for t in m.inputs],
            outputs=[_tensor_metadata(t) for t in m.outputs],
        )

    async def ModelConfig(
        self, request: pb.ModelConfigRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelConfigResponse:
        return pb.ModelConfigResponse(config=self._dp.model_config(request.name, request.version))

    async def ModelStatistics(
        self, request: pb.ModelStatisticsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelStatisticsResponse:
        versions = self._dp.model_statistics(request.name, request.version)
        return pb.ModelStatisticsResponse(
            model_stats=[statistics_message(v.name, v.version, v.stats) for v in versions]
        )

    # ---- repository (Triton's model_repository extension) -----------------------

    async def RepositoryIndex(
        self, request: pb.RepositoryIndexRequest, context: grpc.aio.ServicerContext
    ) -> pb.RepositoryIndexResponse:
        entries = await self._dp.repository_index(request.ready)
        return pb.RepositoryIndexResponse(
            models=[
                pb.RepositoryIndexResponse.ModelIndex(
                    name=e.name, version=e.version, state=e.state, reason=e.reason
                )
                for e in entries
            ]
        )

    async def RepositoryModelLoad(
        self, request: pb.RepositoryModelLoadRequest, context: grpc.aio.ServicerContext
    ) -> pb.RepositoryModelLoadResponse:
        texts = {k: p.string_param for k, p in request.parameters.items()}
        override = config_override(request.model_name, texts)
        await self._dp.load_model(request.model_name, override)
        return pb.RepositoryModelLoadResponse()

    async def RepositoryModelUnload(
        self, request: pb.RepositoryModelUnloadRequest, context: grpc.aio.ServicerContext
    ) -> pb.RepositoryModelUnloadResponse:
        await self._dp.unload_model(request.model_name)
        return pb.RepositoryModelUnloadResponse()

    # ---- inference -----------------------------------------------------------

    async def _respond(
        self,
        msg: pb.ModelInferRequest | wire.InferRequestMessage,
        time_remaining_s: float | None = None,
    ) -> tuple[InferResponse, bool]:
        """The data plane's response, and whether the request used raw contents.
        The request's tensors are released when this returns (before encoding)."""
        received_ns = _core.monotonic_ns()
        try:
            request = codec.decode_request(msg, received_ns)
        except (SluiceError, _core.StatusError) as exc:
            # Undecodable input never reaches the data plane; count it here.
            self._dp.record_rejected(msg.model_name, msg.model_version, received_ns, exc)
            raise
        if time_remaining_s is not None:
            request.deadline_ns = max(1, int(time_remaining_s * 1e9))
        return await self._dp.infer(request), bool(msg.raw_input_contents)

    async def stream_bytes(self, msg: pb.ModelInferRequest | wire.InferRequestMessage) -> bytes:
        """A stream message's reply, serialized (large outputs straight from
        their arrays). Raises what the request failed with."""
        response, raw = await self._respond(msg)
        return codec.encode_stream_reply(response, raw)

    async def ModelInfer(
        self,
        request: pb.ModelInferRequest | wire.InferRequestMessage,
        context: grpc.aio.ServicerContext,
    ) -> pb.ModelInferResponse | wire.InferResponseMessage:
        # server/wire.py parses and serializes this RPC without copying tensors.
        response, raw = await self._respond(request, context.time_remaining())
        return codec.encode_response_for_wire(response, raw)

    async def stream_reply(
        self, msg: pb.ModelInferRequest | wire.InferRequestMessage | Undecodable
    ) -> bytes | pb.ModelStreamInferResponse:
        """One stream message's reply: its response, or its error in-band."""
        if isinstance(msg, Undecodable):
            return pb.ModelStreamInferResponse(error_message=msg.message())
        try:
            return await self.stream_bytes(msg)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            return stream_error(msg, exc)

    async def ModelStreamInfer(
        self,
        request_iterator: AsyncIterator[
            pb.ModelInferRequest | wire.InferRequestMessage | Undecodable
        ],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[bytes | pb.ModelStreamInferResponse]:
        ordered = wants_request_order(context.invocation_metadata())
        async for reply in stream_replies(request_iterator, self.stream_reply, ordered=ordered):
            yield reply


def stream_error(
    msg: pb.ModelInferRequest | wire.InferRequestMessage, exc: BaseException
) -> pb.ModelStreamInferResponse:
    """A failed stream message's reply: the error, with the request's id and model."""
    reply = pb.ModelStreamInferResponse(error_message=error_text(exc))
    reply.infer_response.id = msg.id
    reply.infer_response.model_name = msg.model_name
    return reply
