"""A synchronous streaming client for offline scoring (`sluice batch --url`):
many requests on one ModelStreamInfer stream, answers matched by request id.

Contract: `StreamClient` is used from one thread; `infer_many` blocks until
every request of the call is answered, or raises ClientError on the first
refusal (the stream's other answers are then dropped)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import grpc
import numpy as np

from sluice import client
from sluice.client import ClientError, decode_outputs
from sluice.proto import grpc_service_pb2 as pb
from sluice.proto import grpc_service_pb2_grpc as pb_grpc
from sluice.proto import model_config_pb2 as mc

Array = np.ndarray[Any, Any]


class StreamClient:
    def __init__(self, url: str, timeout_s: float, tls: client.ClientTls | None = None) -> None:
        # Offline batches are large by design; the server enforces its own limit.
        self._channel = client.channel(
            url,
            [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)],
            tls,
        )
        self._stub = pb_grpc.GRPCInferenceServiceStub(self._channel)
        self._timeout_s = timeout_s

    def close(self) -> None:
        self._channel.close()

    def config(self, model: str, version: str, timeout_s: float = 30.0) -> mc.ModelConfig:
        try:
            reply = self._stub.ModelConfig(
                pb.ModelConfigRequest(name=model, version=version), timeout=timeout_s
            )
        except grpc.RpcError as exc:
            raise ClientError(exc.code().name, exc.details() or "") from None
        config: mc.ModelConfig = reply.config
        return config

    def infer_many(
        self,
        model: str,
        version: str,
        batches: Sequence[Mapping[str, Array]],
        wire_types: Mapping[str, str],
        outputs: Sequence[str],
    ) -> list[dict[str, Array]]:
        """Every batch as one request on one stream; results in `batches` order."""

        def requests() -> Any:
            for index, feeds in enumerate(batches):
                request = pb.ModelInferRequest(
                    model_name=model, model_version=version, id=str(index)
                )
                for name, arr in feeds.items():
                    request.inputs.add(name=name, datatype=wire_types[name], shape=list(arr.shape))
                    request.raw_input_contents.append(np.ascontiguousarray(arr).tobytes())
                for name in outputs:
                    request.outputs.add(name=name)
                yield request

        results: list[dict[str, Array] | None] = [None] * len(batches)
        try:
            for reply in self._stub.ModelStreamInfer(requests(), timeout=self._timeout_s):
                if reply.error_message:
                    raise ClientError("INVALID_ARGUMENT", reply.error_message)
                index = int(reply.infer_response.id)
                if not 0 <= index < len(results):
                    raise ClientError("INTERNAL", f"an answer names request id {index}")
                results[index] = decode_outputs(reply.infer_response)
        except grpc.RpcError as exc:
            raise ClientError(exc.code().name, exc.details() or "") from None
        missing = sum(r is None for r in results)
        if missing:
            raise ClientError(
                "UNAVAILABLE", f"the stream ended with {missing} request(s) unanswered"
            )
        return [r for r in results if r is not None]
