"""Benchmark fixture: a KServe ModelServer serving one ONNX model through a
minimal ``kserve.Model`` subclass that runs onnxruntime. Used by
benchmarks/rest.py only, in benchmarks/.venv-kserve (install_rest_peers.sh).

Usage: ``python kserve_onnx.py MODEL.onnx --name NAME --port PORT
[--max-batch-size N] [--intra-op-threads 1]``

KServe's own REST server (FastAPI on uvicorn, uvloop, one worker), as
``ModelServer.start`` runs it, with three changes that are not about speed of
the inference path: it binds 127.0.0.1 (KServe hard-codes 0.0.0.0), gRPC is off
(only REST is measured), and per-request log lines are off (KServe's latency and
timing lines, uvicorn's access log; sluice writes none either). perf_analyzer asks
Triton's GET /v2/models/<m>/config before it starts, which KServe does not
serve: the fixture adds that route, answered from the session's inputs.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

import numpy as np
import onnxruntime as ort


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("model", help="the .onnx file")
    p.add_argument("--name", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--max-batch-size", type=int, default=0)
    p.add_argument("--intra-op-threads", type=int, default=1)
    return p.parse_args()


# kserve.model_server parses sys.argv when imported: hand it none of ours.
ARGS = parse_args()
sys.argv = sys.argv[:1]

import kserve  # noqa: E402
import kserve.model_server  # noqa: E402
from kserve import InferOutput, InferRequest, InferResponse  # noqa: E402
from kserve.logging import KSERVE_TRACE_LOGGER_NAME  # noqa: E402
from kserve.protocol.rest.server import RESTServer  # noqa: E402

_V2 = {"tensor(float)": ("FP32", "TYPE_FP32")}


class OnnxModel(kserve.Model):  # type: ignore[misc]
    def __init__(self, name: str, path: str, intra_op_threads: int) -> None:
        super().__init__(name)
        self._path = path
        self._threads = intra_op_threads

    def load(self) -> bool:
        options = ort.SessionOptions()
        options.intra_op_num_threads = self._threads
        options.inter_op_num_threads = 1
        self._session = ort.InferenceSession(
            self._path, options, providers=["CPUExecutionProvider"]
        )
        self._outputs = [o.name for o in self._session.get_outputs()]
        self.ready = True
        return True

    @staticmethod
    def _types(tensors: Any) -> list[dict[str, Any]]:
        return [
            {"name": t.name, "datatype": _V2[t.type][0], "shape": [-1, *t.shape[1:]]}
            for t in tensors
        ]

    def get_input_types(self) -> list[dict[str, Any]]:
        return self._types(self._session.get_inputs())

    def get_output_types(self) -> list[dict[str, Any]]:
        return self._types(self._session.get_outputs())

    async def predict(
        self,
        payload: InferRequest,
        headers: dict[str, str] | None = None,
        response_headers: dict[str, str] | None = None,
    ) -> InferResponse:
        feed = {i.name: i.as_numpy().astype(np.float32, copy=False) for i in payload.inputs}
        results = self._session.run(self._outputs, feed)
        outputs = []
        for name, value in zip(self._outputs, results, strict=True):
            out = InferOutput(name=name, shape=list(value.shape), datatype="FP32")
            out.set_data_from_numpy(value, binary_data=payload.use_binary_outputs)
            outputs.append(out)
        # KServe encodes what the request asked for: binary outputs for the whole
        # request or per requested output (Triton's binary tensor extension).
        return InferResponse(
            response_id=payload.id or "",
            model_name=self.name,
            infer_outputs=outputs,
            use_binary_outputs=payload.use_binary_outputs,
            requested_outputs=payload.request_outputs,
        )

    def triton_config(self, max_batch_size: int) -> dict[str, Any]:
        def tensor(t: Any) -> dict[str, Any]:
            return {"name": t.name, "data_type": _V2[t.type][1], "dims": t.shape[1:]}

        return {
            "name": self.name,
            "platform": "onnxruntime_onnx",
            "max_batch_size": max_batch_size,
            "input": [tensor(t) for t in self._session.get_inputs()],
            "output": [tensor(t) for t in self._session.get_outputs()],
        }


class LoopbackRESTServer(RESTServer):  # type: ignore[misc]
    """KServe's REST server on 127.0.0.1, without a log line per request:
    uvicorn's access log and the timing middleware's line on kserve.trace
    (KServe has configured logging by the time this is built)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.config.host = "127.0.0.1"
        logging.getLogger("uvicorn.access").disabled = True
        logging.getLogger(KSERVE_TRACE_LOGGER_NAME).disabled = True


def main() -> None:
    model = OnnxModel(ARGS.name, ARGS.model, ARGS.intra_op_threads)
    model.load()
    config = model.triton_config(ARGS.max_batch_size)

    async def triton_config(model_name: str) -> dict[str, Any]:
        return config

    kserve.model_server.app.add_api_route(
        "/v2/models/{model_name}/config", triton_config, methods=["GET"]
    )
    kserve.model_server.RESTServer = LoopbackRESTServer
    kserve.ModelServer(
        http_port=ARGS.port, enable_grpc=False, workers=1, enable_latency_logging=False
    ).start([model])


if __name__ == "__main__":
    main()
