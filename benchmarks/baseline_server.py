"""The floor any serving stack must beat: a minimal KServe-v2 gRPC server.

Usage: ``python benchmarks/baseline_server.py MODEL_DIR [--host 127.0.0.1] [--port 0]
[--workers 1] [--intra-op-threads 1] [--frontend-only]``

Serves ONE ONNX model, ``MODEL_DIR/1/model.onnx``, named after MODEL_DIR. grpc.aio
on uvloop; each ModelInfer runs ``session.run`` once on a worker thread
(``run_in_executor``), raw contents in and out, no batching, no statistics.
Implements ServerLive/Ready, ServerMetadata (no extensions), ModelReady,
ModelMetadata, ModelConfig (max_batch_size 64) and ModelInfer; everything else
answers UNIMPLEMENTED. ``--workers`` is the executor's thread count (default 1:
the same compute as a sluice model with one instance). Prints
``baseline ready: grpc HOST:PORT model NAME`` once serving. Uses tritonclient's
generated protos, so it never shares a process with sluice's.

``--frontend-only`` measures what grpc.aio alone costs: ModelInfer still parses
and checks every input, but answers from a cache of real model outputs keyed on
the input shapes (filled by one ``session.run`` the first time a shape is seen),
so no request waits on onnxruntime or a thread hop. No server built on grpc.aio
in one process can answer faster than this.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import onnxruntime as ort
from tritonclient.grpc import model_config_pb2 as mc
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

MAX_BATCH_SIZE = 64
VERSION = "1"

# onnxruntime type string -> (KServe datatype, numpy dtype, ModelConfig DataType)
_TYPES: dict[str, tuple[str, Any, int]] = {
    "tensor(float)": ("FP32", np.float32, mc.TYPE_FP32),
    "tensor(double)": ("FP64", np.float64, mc.TYPE_FP64),
    "tensor(float16)": ("FP16", np.float16, mc.TYPE_FP16),
    "tensor(int8)": ("INT8", np.int8, mc.TYPE_INT8),
    "tensor(int16)": ("INT16", np.int16, mc.TYPE_INT16),
    "tensor(int32)": ("INT32", np.int32, mc.TYPE_INT32),
    "tensor(int64)": ("INT64", np.int64, mc.TYPE_INT64),
    "tensor(uint8)": ("UINT8", np.uint8, mc.TYPE_UINT8),
    "tensor(bool)": ("BOOL", np.bool_, mc.TYPE_BOOL),
}
_BY_WIRE = {wire: np.dtype(dt) for wire, dt, _ in _TYPES.values()}


def _shape(dims: Sequence[Any]) -> list[int]:
    return [d if isinstance(d, int) and d >= 0 else -1 for d in dims]


class Baseline(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(
        self, model_dir: Path, workers: int, intra_op_threads: int, frontend_only: bool = False
    ) -> None:
        self.name = model_dir.resolve().name
        so = ort.SessionOptions()
        so.intra_op_num_threads = intra_op_threads
        so.log_severity_level = 3
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(
            str(model_dir / VERSION / "model.onnx"), so, providers=["CPUExecutionProvider"]
        )
        self.inputs = {i.name: i for i in self.session.get_inputs()}
        self.outputs = [o.name for o in self.session.get_outputs()]
        self.out_types = {o.name: _TYPES[o.type][0] for o in self.session.get_outputs()}
        self.executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=workers, thread_name_prefix="ort"
        )
        # --frontend-only: (output names, input shapes) -> encoded outputs
        self.cache: dict[tuple[Any, ...], list[tuple[str, list[int], bytes]]] | None = (
            {} if frontend_only else None
        )

    # ---- health and metadata
    async def ServerLive(self, request: Any, context: Any) -> Any:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: Any, context: Any) -> Any:
        return pb.ServerReadyResponse(ready=True)

    async def ServerMetadata(self, request: Any, context: Any) -> Any:
        return pb.ServerMetadataResponse(name="baseline", version="0.1.0", extensions=[])

    async def _check(self, name: str, version: str, context: Any) -> None:
        if name != self.name or version not in ("", VERSION):
            await context.abort(
                grpc.StatusCode.NOT_FOUND, f"unknown model '{name}' version '{version}'"
            )

    async def ModelReady(self, request: Any, context: Any) -> Any:
        ok = request.name == self.name and request.version in ("", VERSION)
        return pb.ModelReadyResponse(ready=ok)

    async def ModelMetadata(self, request: Any, context: Any) -> Any:
        await self._check(request.name, request.version, context)
        tm = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=self.name,
            versions=[VERSION],
            platform="onnxruntime_onnx",
            inputs=[
                tm(name=i.name, datatype=_TYPES[i.type][0], shape=_shape(i.shape))
                for i in self.session.get_inputs()
            ],
            outputs=[
                tm(name=o.name, datatype=_TYPES[o.type][0], shape=_shape(o.shape))
                for o in self.session.get_outputs()
            ],
        )

    async def ModelConfig(self, request: Any, context: Any) -> Any:
        await self._check(request.name, request.version, context)
        config = mc.ModelConfig(
            name=self.name, platform="onnxruntime_onnx", max_batch_size=MAX_BATCH_SIZE
        )
        for i in self.session.get_inputs():
            config.input.add(name=i.name, data_type=_TYPES[i.type][2], dims=_shape(i.shape)[1:])
        for o in self.session.get_outputs():
            config.output.add(name=o.name, data_type=_TYPES[o.type][2], dims=_shape(o.shape)[1:])
        config.instance_group.add(count=1, kind=mc.ModelInstanceGroup.KIND_CPU)
        return pb.ModelConfigResponse(config=config)

    # ---- inference
    async def ModelInfer(self, request: Any, context: Any) -> Any:
        await self._check(request.model_name, request.model_version, context)
        if len(request.raw_input_contents) != len(request.inputs):
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, "baseline server takes raw_input_contents only"
            )
        feeds: dict[str, np.ndarray[Any, Any]] = {}
        for tensor, raw in zip(request.inputs, request.raw_input_contents, strict=True):
            dtype = _BY_WIRE.get(tensor.datatype)
            if tensor.name not in self.inputs or dtype is None:
                await context.abort(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"unexpected input '{tensor.name}' ({tensor.datatype})",
                )
            try:
                feeds[tensor.name] = np.frombuffer(raw, dtype=dtype).reshape(tuple(tensor.shape))
            except ValueError as exc:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        wanted = [o.name for o in request.outputs] or self.outputs
        if self.cache is not None:
            return self._cached(request, wanted, feeds)
        loop = asyncio.get_running_loop()
        try:
            results = await loop.run_in_executor(self.executor, self.session.run, wanted, feeds)
        except Exception as exc:  # onnxruntime raises its own exception types
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        return self._response(request, _encode(wanted, results))

    async def ModelStreamInfer(self, request_iterator: Any, context: Any) -> Any:
        """Messages answered one after another, in order (the stream floor, with
        --frontend-only: grpc.aio's own cost per bidirectional-stream message)."""
        async for request in request_iterator:
            response = await self.ModelInfer(request, context)
            yield pb.ModelStreamInferResponse(infer_response=response)

    def _cached(self, request: Any, wanted: list[str], feeds: dict[str, Any]) -> Any:
        assert self.cache is not None
        key = (tuple(wanted), *((n, a.shape) for n, a in sorted(feeds.items())))
        encoded = self.cache.get(key)
        if encoded is None:
            encoded = self.cache[key] = _encode(wanted, self.session.run(wanted, feeds))
        return self._response(request, encoded)

    def _response(self, request: Any, encoded: list[tuple[str, list[int], bytes]]) -> Any:
        response = pb.ModelInferResponse(model_name=self.name, model_version=VERSION, id=request.id)
        for name, shape, raw in encoded:
            response.outputs.add(name=name, datatype=self.out_types[name], shape=shape)
            response.raw_output_contents.append(raw)
        return response


def _encode(names: list[str], arrays: Sequence[Any]) -> list[tuple[str, list[int], bytes]]:
    """(name, shape, raw bytes) of each output."""
    return [
        (name, list(arr.shape), np.ascontiguousarray(arr).tobytes())
        for name, arr in zip(names, arrays, strict=True)
    ]


async def serve(args: argparse.Namespace) -> None:
    servicer = Baseline(args.model_dir, args.workers, args.intra_op_threads, args.frontend_only)
    limit = 256 * 1024 * 1024
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", limit),
            ("grpc.max_send_message_length", limit),
            ("grpc.so_reuseport", 0),
        ]
    )
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port(f"{args.host}:{args.port}")
    await server.start()
    print(f"baseline ready: grpc {args.host}:{port} model {servicer.name}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(1.0)
    servicer.executor.shutdown(wait=False, cancel_futures=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("model_dir", type=Path, help="folder holding 1/model.onnx")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--workers", type=int, default=1, help="threads running session.run")
    parser.add_argument("--intra-op-threads", type=int, default=1)
    parser.add_argument(
        "--frontend-only",
        action="store_true",
        help="answer from a cache of model outputs keyed on input shapes: grpc.aio's own cost",
    )
    args = parser.parse_args(argv)
    if not (args.model_dir / VERSION / "model.onnx").is_file():
        print(f"baseline: {args.model_dir}/{VERSION}/model.onnx not found", file=sys.stderr)
        return 2
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a sluice dependency off Windows
        asyncio.run(serve(args))
    else:
        uvloop.run(serve(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
