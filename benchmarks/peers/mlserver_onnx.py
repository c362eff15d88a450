"""Benchmark fixture: a minimal MLServer inference runtime that runs an ONNX
model with onnxruntime (MLServer ships none for ONNX). Used by benchmarks/rest.py
only; it runs in benchmarks/.venv-mlserver (install_rest_peers.sh), never in
sluice's environment.

model-settings.json names it as ``"implementation": "mlserver_onnx.OnnxRuntime"``
and gives ``parameters.uri`` (the .onnx file) and ``parameters.extra``:
``{"max_batch_size": N, "intra_op_threads": N}``. One session, one thread pool,
as sluice's instance of the same model; each request runs alone (MLServer's
adaptive batching is off unless model-settings sets max_batch_size).

perf_analyzer asks Triton's GET /v2/models/<m>/config before it starts; MLServer
has no such path, so the runtime adds it with a custom handler built from the
session's inputs and outputs. It is read once, never on the inference path.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnxruntime as ort
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.handlers import custom_handler
from mlserver.types import InferenceRequest, InferenceResponse, ResponseOutput

_ORT_TO_V2 = {"tensor(float)": ("FP32", "TYPE_FP32")}


def _extra(model: MLModel) -> dict[str, Any]:
    params = model.settings.parameters
    return dict(params.extra or {}) if params is not None else {}


class OnnxRuntime(MLModel):
    async def load(self) -> bool:
        params = self.settings.parameters
        if params is None or not params.uri:
            raise ValueError("model-settings.json must give parameters.uri (the .onnx file)")
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(_extra(self).get("intra_op_threads", 1))
        options.inter_op_num_threads = 1
        self._session = ort.InferenceSession(
            params.uri, options, providers=["CPUExecutionProvider"]
        )
        self._inputs = self._session.get_inputs()
        self._outputs = [o.name for o in self._session.get_outputs()]
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        feed = {
            i.name: NumpyCodec.decode_input(i).astype(np.float32, copy=False)
            for i in payload.inputs
        }
        results = self._session.run(self._outputs, feed)
        # Outputs as NumpyCodec.encode_output builds them, less its
        # `parameters: {content_type: np}`: tritonclient's C++ HTTP client (that
        # is, perf_analyzer) reads any output `parameters` as binary data and
        # fails on one without `binary_data_size`.
        return InferenceResponse(
            id=payload.id,
            model_name=self.name,
            outputs=[
                ResponseOutput(
                    name=name,
                    shape=list(value.shape),
                    datatype="FP32",
                    data=value.ravel().tolist(),
                )
                for name, value in zip(self._outputs, results, strict=True)
            ],
        )

    def _config(self) -> dict[str, Any]:
        def tensor(t: Any) -> dict[str, Any]:
            return {"name": t.name, "data_type": _ORT_TO_V2[t.type][1], "dims": t.shape[1:]}

        return {
            "name": self.name,
            "platform": "onnxruntime_onnx",
            "max_batch_size": int(_extra(self).get("max_batch_size", 0)),
            "input": [tensor(t) for t in self._inputs],
            "output": [tensor(t) for t in self._session.get_outputs()],
        }

    @custom_handler(rest_path="/v2/models/{model_name}/config", rest_method="GET")
    async def triton_config(self, model_name: str) -> dict[str, Any]:
        return self._config()
