"""GRPCInferenceService (KServe v2 + Triton's extensions) over the data plane.

Thin by design: decode -> DataPlane -> encode. Errors become gRPC statuses in
`_abort` only, through server/errors.py.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, NoReturn, TypeVar

import grpc
from google.protobuf import json_format

import sluice
from sluice import _core, datatypes
from sluice.dataplane import DataPlane
from sluice.errors import InvalidArgumentError, NotFoundError, SluiceError, UnavailableError
from sluice.monitoring.stats import Duration, InferStats
from sluice.proto import grpc_service_pb2 as pb
from sluice.proto import grpc_service_pb2_grpc as pb_grpc
from sluice.proto import model_config_pb2 as mc
from sluice.repository import ModelManager, ModelVersion
from sluice.server import codec
from sluice.server.errors import as_sluice_error, grpc_status

log = logging.getLogger(__name__)

# Only what is really implemented; perf_analyzer reads "statistics" from here.
EXTENSIONS = ("model_configuration", "model_repository", "statistics", "schedule_policy")
PLATFORM = "onnxruntime_onnx"

T = TypeVar("T")


async def _abort(context: grpc.aio.ServicerContext, exc: BaseException) -> NoReturn:
    error = as_sluice_error(exc)
    if error is None:
        log.exception("unexpected error", exc_info=exc)
        await context.abort(grpc.StatusCode.INTERNAL, f"internal error: {exc}")
    else:
        await context.abort(grpc_status(error), error.message)
    raise AssertionError("context.abort returned")  # it always raises


async def _guard(context: grpc.aio.ServicerContext, call: Awaitable[T]) -> T:
    try:
        return await call
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # every failure leaves as a gRPC status, never UNKNOWN
        await _abort(context, exc)


def _tensor_metadata(t: Any, max_batch_size: int) -> pb.ModelMetadataResponse.TensorMetadata:
    dims = list(t.dims)
    shape = ([-1] if max_batch_size > 0 else []) + dims
    wire = datatypes.BY_CONFIG[mc.DataType.Name(t.data_type)].wire
    return pb.ModelMetadataResponse.TensorMetadata(name=t.name, datatype=wire, shape=shape)


def _config_override(request: pb.RepositoryModelLoadRequest) -> mc.ModelConfig | None:
    """Triton's load parameters: "config" holds a JSON ModelConfig that replaces
    the config file for this load. Model-file overrides ("file:...") are refused."""
    override = None
    for key, param in request.parameters.items():
        if key == "config":
            override = mc.ModelConfig()
            try:
                json_format.Parse(param.string_param, override)
            except json_format.ParseError as exc:
                raise InvalidArgumentError(
                    f"the config override for model '{request.model_name}' is not a valid "
                    f"JSON ModelConfig: {exc}"
                ) from None
        elif key.startswith("file:"):
            raise InvalidArgumentError(
                "model file overrides in load parameters are not supported; publish the "
                "version into the repository instead"
            )
    return override


def _duration(d: Duration) -> pb.StatisticDuration:
    return pb.StatisticDuration(count=d.count, ns=d.ns)


def _model_statistics(mv: ModelVersion) -> pb.ModelStatistics:
    s: InferStats = mv.stats
    out = pb.ModelStatistics(
        name=mv.name,
        version=str(mv.version),
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
    def __init__(
        self,
        models: ModelManager,
        dataplane: DataPlane,
        is_ready: Callable[[], bool],
        explicit_control: bool = False,
    ) -> None:
        self._models = models
        self._dataplane = dataplane
        self._is_ready = is_ready
        self._explicit = explicit_control

    # ---- health and metadata -------------------------------------------------

    async def ServerLive(
        self, request: pb.ServerLiveRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(
        self, request: pb.ServerReadyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self._is_ready())

    async def ModelReady(
        self, request: pb.ModelReadyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelReadyResponse:
        try:
            self._models.resolve(request.name, request.version)
        except SluiceError:
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=True)

    async def ServerMetadata(
        self, request: pb.ServerMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(
            name="sluice", version=sluice.__version__, extensions=list(EXTENSIONS)
        )

    async def ModelMetadata(
        self, request: pb.ModelMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelMetadataResponse:
        try:
            mv = self._models.resolve(request.name, request.version)
        except SluiceError as exc:
            await _abort(context, exc)
        model = self._models.model(mv.name)
        mbs = mv.config.max_batch_size
        return pb.ModelMetadataResponse(
            name=mv.name,
            versions=[str(v.version) for v in model.ready_versions()],
            platform=PLATFORM,
            inputs=[_tensor_metadata(t, mbs) for t in mv.config.input],
            outputs=[_tensor_metadata(t, mbs) for t in mv.config.output],
        )

    async def ModelConfig(
        self, request: pb.ModelConfigRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelConfigResponse:
        try:
            mv = self._models.resolve(request.name, request.version)
        except SluiceError as exc:
            await _abort(context, exc)
        return pb.ModelConfigResponse(config=mv.config)

    async def ModelStatistics(
        self, request: pb.ModelStatisticsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelStatisticsResponse:
        try:
            if request.name:
                model = self._models.model(request.name)
                versions = list(model.versions.values())
                if request.version:
                    versions = [self._models.resolve(request.name, request.version)]
            else:
                versions = [v for m in self._models.models.values() for v in m.versions.values()]
            versions = [v for v in versions if v.ready]
            if request.name and not versions:
                raise NotFoundError(f"requested model '{request.name}' is not available")
        except SluiceError as exc:
            await _abort(context, exc)
        return pb.ModelStatisticsResponse(model_stats=[_model_statistics(v) for v in versions])

    # ---- repository (Triton's model_repository extension) -----------------------

    async def RepositoryIndex(
        self, request: pb.RepositoryIndexRequest, context: grpc.aio.ServicerContext
    ) -> pb.RepositoryIndexResponse:
        entries = self._models.index()
        if request.ready:
            entries = [e for e in entries if e.state == "READY"]
        return pb.RepositoryIndexResponse(
            models=[
                pb.RepositoryIndexResponse.ModelIndex(
                    name=e.name, version=e.version, state=e.state, reason=e.reason
                )
                for e in entries
            ]
        )

    def _require_explicit(self) -> None:
        if not self._explicit:
            raise UnavailableError(
                "explicit model load / unload is not allowed unless the server runs with "
                "--model-control-mode explicit"
            )

    async def RepositoryModelLoad(
        self, request: pb.RepositoryModelLoadRequest, context: grpc.aio.ServicerContext
    ) -> pb.RepositoryModelLoadResponse:
        try:
            self._require_explicit()
            await self._models.load(request.model_name, _config_override(request))
        except Exception as exc:
            await _abort(context, exc)
        return pb.RepositoryModelLoadResponse()

    async def RepositoryModelUnload(
        self, request: pb.RepositoryModelUnloadRequest, context: grpc.aio.ServicerContext
    ) -> pb.RepositoryModelUnloadResponse:
        try:
            self._require_explicit()
            await self._models.unload(request.model_name)
        except Exception as exc:
            await _abort(context, exc)
        return pb.RepositoryModelUnloadResponse()

    # ---- inference -----------------------------------------------------------

    async def _infer(
        self, msg: pb.ModelInferRequest, time_remaining_s: float | None = None
    ) -> pb.ModelInferResponse:
        received_ns = _core.monotonic_ns()
        try:
            request = codec.decode_request(msg, received_ns)
        except (SluiceError, _core.StatusError) as exc:
            # Undecodable input never reaches the data plane; count it here.
            self._dataplane.record_rejected(msg.model_name, msg.model_version, received_ns, exc)
            raise
        if time_remaining_s is not None:
            request.deadline_ns = max(1, int(time_remaining_s * 1e9))
        response = await self._dataplane.infer(request)
        return codec.encode_response(response, raw=bool(msg.raw_input_contents))

    async def ModelInfer(
        self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelInferResponse:
        return await _guard(context, self._infer(request, context.time_remaining()))

    async def ModelStreamInfer(
        self,
        request_iterator: AsyncIterator[pb.ModelInferRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        # Requests on one stream run concurrently; responses go back as they
        # finish (clients match them by request id), errors in-band per request.
        responses: asyncio.Queue[pb.ModelStreamInferResponse | None] = asyncio.Queue()
        pending: set[asyncio.Task[None]] = set()

        async def one(msg: pb.ModelInferRequest) -> None:
            try:
                reply = pb.ModelStreamInferResponse(infer_response=await self._infer(msg))
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                error = as_sluice_error(exc)
                if error is None:
                    log.exception("unexpected error in stream request", exc_info=exc)
                text = error.message if error is not None else f"internal error: {exc}"
                reply = pb.ModelStreamInferResponse(error_message=text)
                reply.infer_response.id = msg.id
                reply.infer_response.model_name = msg.model_name
            await responses.put(reply)

        async def read() -> None:
            async for msg in request_iterator:
                task = asyncio.create_task(one(msg))
                pending.add(task)
                task.add_done_callback(pending.discard)
            if pending:
                await asyncio.wait(set(pending))
            await responses.put(None)

        reader = asyncio.create_task(read())
        try:
            while (reply := await responses.get()) is not None:
                yield reply
            await reader  # surface a reader failure
        finally:
            reader.cancel()
            for task in list(pending):
                task.cancel()
