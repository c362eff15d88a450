"""The client side of sluice: the one place a client opens a channel to a
server (every command that talks to one goes through channel()/aio_channel(),
so transport security is added here once), and a small synchronous KServe v2
client for `sluice infer`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import grpc
import numpy as np

from sluice import _core, datatypes
from sluice.proto import grpc_service_pb2 as pb
from sluice.proto import grpc_service_pb2_grpc as pb_grpc
from sluice.server.security import ClientTls, make_aio_channel, make_channel

ChannelOptions = Sequence[tuple[str, Any]]


def channel(url: str, options: ChannelOptions = (), tls: ClientTls | None = None) -> grpc.Channel:
    """A blocking channel to the server at host:port (TLS/mTLS with `tls`)."""
    return make_channel(url, tls, list(options))


def aio_channel(
    url: str, options: ChannelOptions = (), tls: ClientTls | None = None
) -> grpc.aio.Channel:
    """An asyncio channel to the server at host:port (TLS/mTLS with `tls`)."""
    return make_aio_channel(url, tls, list(options))


class ClientError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class InferenceClient:
    def __init__(self, url: str, timeout_s: float = 30.0, tls: ClientTls | None = None) -> None:
        self._channel = channel(url, tls=tls)
        self._stub = pb_grpc.GRPCInferenceServiceStub(self._channel)
        self._timeout = timeout_s

    def close(self) -> None:
        self._channel.close()

    def _call(self, method: str, request: Any) -> Any:
        try:
            return getattr(self._stub, method)(request, timeout=self._timeout)
        except grpc.RpcError as exc:
            raise ClientError(exc.code().name, exc.details() or "") from None

    def metadata(self, model: str, version: str = "") -> pb.ModelMetadataResponse:
        response: pb.ModelMetadataResponse = self._call(
            "ModelMetadata", pb.ModelMetadataRequest(name=model, version=version)
        )
        return response

    def infer(
        self,
        model: str,
        inputs: dict[str, np.ndarray[Any, Any]],
        version: str = "",
        outputs: list[str] | None = None,
    ) -> tuple[pb.ModelInferResponse, dict[str, np.ndarray[Any, Any]]]:
        meta = {t.name: t.datatype for t in self.metadata(model, version).inputs}
        request = pb.ModelInferRequest(model_name=model, model_version=version)
        for name, arr in inputs.items():
            wire = meta.get(name) or datatypes.from_numpy(arr.dtype).wire
            dt = datatypes.BY_WIRE[wire]
            request.inputs.add(name=name, datatype=wire, shape=list(arr.shape))
            if dt.is_bytes:
                flat = [
                    v if isinstance(v, bytes | str) else str(v) for v in arr.reshape(-1).tolist()
                ]
                request.raw_input_contents.append(_core.encode_bytes_tensor(flat))
            else:
                assert dt.numpy is not None
                request.raw_input_contents.append(
                    np.ascontiguousarray(arr, dtype=dt.numpy).tobytes()
                )
        for name in outputs or []:
            request.outputs.add(name=name)
        response = self._call("ModelInfer", request)
        return response, decode_outputs(response)


def decode_outputs(response: pb.ModelInferResponse) -> dict[str, np.ndarray[Any, Any]]:
    out: dict[str, np.ndarray[Any, Any]] = {}
    for i, t in enumerate(response.outputs):
        dt = datatypes.BY_WIRE[t.datatype]
        shape = tuple(t.shape)
        raw = response.raw_output_contents[i]
        count = int(np.prod(shape, dtype=np.int64))
        if dt.is_bytes:
            arr = np.empty(count, dtype=object)
            arr[:] = _core.decode_bytes_tensor(raw, count, False)
            out[t.name] = arr.reshape(shape)
        else:
            assert dt.numpy is not None
            out[t.name] = np.frombuffer(raw, dtype=dt.numpy).reshape(shape)
    return out
