"""The client side of sluice: the one place a client opens a channel to a
server (every command that talks to one goes through channel()/aio_channel(),
so transport security is added here once), and a small synchronous KServe v2
client for `sluice infer`."""

from __future__ import annotations

import dataclasses
import ssl
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from sluice import _core, datatypes
from sluice.proto import grpc_service_pb2 as pb
from sluice.proto import grpc_service_pb2_grpc as pb_grpc

ChannelOptions = Sequence[tuple[str, Any]]


@dataclasses.dataclass(frozen=True)
class ClientTls:
    """A client's TLS settings (the server runs with --grpc-use-ssl): the CA to
    trust (None: the system's), and a client certificate and key for mutual TLS
    (--grpc-use-ssl-mutual). The files are read when a channel is opened."""

    root_cert: Path | None = None
    client_cert: Path | None = None
    client_key: Path | None = None

    def __post_init__(self) -> None:
        if (self.client_cert is None) != (self.client_key is None):
            raise ValueError("a client certificate needs its key, and the key its certificate")

    def credentials(self) -> grpc.ChannelCredentials:
        def read(path: Path | None) -> bytes | None:
            return path.read_bytes() if path is not None else None

        return grpc.ssl_channel_credentials(
            root_certificates=read(self.root_cert),
            private_key=read(self.client_key),
            certificate_chain=read(self.client_cert),
        )

    def ssl_context(self) -> ssl.SSLContext:
        """The same trust and identity for an HTTPS client (a /metrics scrape)."""
        context = ssl.create_default_context(
            cafile=str(self.root_cert) if self.root_cert is not None else None
        )
        if self.client_cert is not None and self.client_key is not None:
            context.load_cert_chain(self.client_cert, self.client_key)
        return context


def channel(url: str, options: ChannelOptions = (), tls: ClientTls | None = None) -> grpc.Channel:
    """A blocking channel to the server at host:port: plaintext without `tls`,
    else TLS (mutual when `tls` has a client certificate)."""
    if tls is None:
        return grpc.insecure_channel(url, options=list(options))
    return grpc.secure_channel(url, tls.credentials(), options=list(options))


def aio_channel(
    url: str, options: ChannelOptions = (), tls: ClientTls | None = None
) -> grpc.aio.Channel:
    """As channel(), for asyncio clients (sluice bench)."""
    if tls is None:
        return grpc.aio.insecure_channel(url, options=list(options))
    return grpc.aio.secure_channel(url, tls.credentials(), options=list(options))


def connection_hint(details: str, tls: ClientTls | None) -> str:
    """What to check, in the command line's terms, when no connection could be
    made ("" otherwise: an UNAVAILABLE answer from a server needs no hint)."""
    if "failed to connect" not in details:
        return ""
    if tls is None:
        return (
            " (no TLS options given: if the server runs with --grpc-use-ssl, add --root-cert "
            "CA.pem, or --ssl to trust the system's CAs)"
        )
    if "CERTIFICATE_VERIFY_FAILED" in details:
        trusted = "--root-cert" if tls.root_cert is not None else "the system's CAs"
        return f" (the server's certificate is not signed by {trusted}: check --root-cert)"
    if tls.client_cert is None:
        return (
            " (if the server runs with --grpc-use-ssl-mutual, add --client-cert and "
            "--client-key; or the server does not use TLS: leave the TLS options out)"
        )
    return ""


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
        self._tls = tls

    def close(self) -> None:
        self._channel.close()

    def _call(self, method: str, request: Any) -> Any:
        try:
            return getattr(self._stub, method)(request, timeout=self._timeout)
        except grpc.RpcError as exc:
            details = exc.details() or ""
            hint = connection_hint(details, self._tls)
            raise ClientError(exc.code().name, details + hint) from None

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
