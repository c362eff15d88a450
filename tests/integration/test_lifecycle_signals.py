"""Graceful stop on SIGTERM/SIGINT: accepted requests finish, the process exits 0,
and the server is gone afterwards (new requests get UNAVAILABLE).

A deliberately slow model (a chain of 1024x1024 MatMuls that depends on the input,
so onnxruntime cannot fold it away) keeps requests in flight long enough; its
latency is measured on the running server, not assumed.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as aioclient
from conftest import ServerProcess
from onnx import TensorProto, helper, numpy_helper
from tritonclient.utils import InferenceServerException

MODEL = "slow_matmul"
SIZE = 1024
LAYERS = 8
CONCURRENCY = 8


def _build_slow_model(path: Path) -> None:
    """``scale`` FP32 [1, 1] -> ``y`` FP32 [1, 1] = sum((A * scale) @ A @ ... @ A)."""
    rng = np.random.default_rng(7)
    a = (rng.standard_normal((SIZE, SIZE)) / np.sqrt(SIZE)).astype(np.float32)
    nodes = [helper.make_node("Mul", ["A", "scale"], ["m0"])]
    nodes += [helper.make_node("MatMul", [f"m{i}", "A"], [f"m{i + 1}"]) for i in range(LAYERS)]
    nodes.append(helper.make_node("ReduceSum", [f"m{LAYERS}"], ["y"], keepdims=1))
    graph = helper.make_graph(
        nodes,
        MODEL,
        [helper.make_tensor_value_info("scale", TensorProto.FLOAT, [1, 1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1])],
        initializer=[numpy_helper.from_array(a, "A")],
    )
    model = helper.make_model(graph, ir_version=8, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model, full_check=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(model.SerializeToString(deterministic=True))


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = tmp_path_factory.mktemp("slow_repo")
    _build_slow_model(repo / MODEL / "1" / "model.onnx")
    return repo


@pytest.fixture(scope="module")
def reference(repository: Path) -> Callable[[float], np.ndarray[Any, Any]]:
    session = ort.InferenceSession(
        str(repository / MODEL / "1" / "model.onnx"), providers=["CPUExecutionProvider"]
    )

    def run(scale: float) -> np.ndarray[Any, Any]:
        feeds = {"scale": np.array([[scale]], np.float32)}
        out: np.ndarray[Any, Any] = session.run(["y"], feeds)[0]
        return out

    return run


def _scale_input(scale: float, module: Any = grpcclient) -> Any:
    inp = module.InferInput("scale", [1, 1], "FP32")
    inp.set_data_from_numpy(np.array([[scale]], np.float32))
    return inp


def _assert_unavailable(url: str) -> None:
    client = grpcclient.InferenceServerClient(url)
    try:
        with pytest.raises(InferenceServerException) as info:
            client.infer(MODEL, [_scale_input(1.0)], client_timeout=10)
        assert info.value.status() == str(grpc.StatusCode.UNAVAILABLE), info.value
    finally:
        client.close()


@pytest.mark.parametrize("frontends", ["1", "2"], ids=["in-process", "2-frontends"])
def test_sigterm_finishes_in_flight_requests_and_exits_0(
    start_server: Callable[..., ServerProcess],
    repository: Path,
    reference: Callable[[float], np.ndarray[Any, Any]],
    frontends: str,
) -> None:
    # With frontend processes, SIGTERM drains each of them while the host answers.
    server = start_server(repository, "--frontends", frontends)
    url = server.url

    # Measure one request on the running server (it was warmed up before READY).
    client = grpcclient.InferenceServerClient(url)
    try:
        started = time.perf_counter()
        client.infer(MODEL, [_scale_input(1.0)])
        latency_s = time.perf_counter() - started
    finally:
        client.close()
    # The premise: one instance serves requests one at a time, each long enough that
    # the other CONCURRENCY-1 are still queued when the first one finishes.
    assert latency_s > 0.005, f"model too fast ({latency_s * 1e3:.1f} ms) to hold requests"

    scales = [0.5 + i for i in range(CONCURRENCY)]

    async def main() -> tuple[int, list[Any]]:
        aio = aioclient.InferenceServerClient(url)
        try:

            async def one(i: int) -> Any:
                result = await aio.infer(
                    MODEL, [_scale_input(scales[i], aioclient)], request_id=f"r{i}"
                )
                return result

            tasks = [asyncio.create_task(one(i)) for i in range(CONCURRENCY)]
            # All requests were issued together; once the first answer is back the
            # server has accepted them all and the rest are queued behind it.
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            in_flight = sum(not t.done() for t in tasks)
            server.proc.send_signal(signal.SIGTERM)
            results = await asyncio.gather(*tasks, return_exceptions=True)
            return in_flight, results
        finally:
            await aio.close()

    in_flight, results = asyncio.run(main())
    assert in_flight >= 1, "no request was still in flight when SIGTERM was sent"

    for i, result in enumerate(results):
        assert not isinstance(result, BaseException), f"request r{i} failed: {result!r}"
        assert result.get_response().id == f"r{i}"
        np.testing.assert_allclose(result.as_numpy("y"), reference(scales[i]), rtol=1e-4)

    assert server.proc.wait(timeout=60) == 0, server.log[-3000:]
    assert "stopped" in server.log
    _assert_unavailable(url)


def test_sigint_exits_0(start_server: Callable[..., ServerProcess], repository: Path) -> None:
    server = start_server(repository)
    client = grpcclient.InferenceServerClient(server.url)
    try:
        assert client.is_server_ready() is True
        assert client.infer(MODEL, [_scale_input(2.0)]).as_numpy("y").shape == (1, 1)
    finally:
        client.close()
    server.proc.send_signal(signal.SIGINT)
    assert server.proc.wait(timeout=60) == 0, server.log[-3000:]
    assert "Traceback" not in server.log
    _assert_unavailable(server.url)
