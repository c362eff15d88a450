"""Dynamic batching end to end: a real server, tritonclient's aio client at
concurrency 32, results equal to onnxruntime run one request at a time."""

from __future__ import annotations

import asyncio
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import tritonclient.grpc as tc
import tritonclient.grpc.aio as tca
from conftest import ServerProcess, wait_until
from onnx import TensorProto, helper
from tritonclient.utils import InferenceServerException

RNG = np.random.default_rng(7)


def _mlp(path: Path) -> None:
    """x [N,16] -> Gemm -> Relu -> Gemm -> y [N,4]."""
    w1 = helper.make_tensor(
        "w1", TensorProto.FLOAT, [16, 32], RNG.standard_normal(512).astype(np.float32)
    )
    w2 = helper.make_tensor(
        "w2", TensorProto.FLOAT, [32, 4], RNG.standard_normal(128).astype(np.float32)
    )
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"]),
        helper.make_node("Relu", ["h"], ["r"]),
        helper.make_node("MatMul", ["r", "w2"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
        initializer=[w1, w2],
    )
    _save(graph, path)


def _gather(path: Path) -> None:
    """y = table[idx] + x: an index out of range makes onnxruntime fail the batch."""
    table = helper.make_tensor("table", TensorProto.FLOAT, [10, 4], np.arange(40, dtype=np.float32))
    graph = helper.make_graph(
        [
            helper.make_node("Gather", ["table", "idx"], ["g"], axis=0),
            helper.make_node("Add", ["g", "x"], ["y"]),
        ],
        "gather",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4]),
            helper.make_tensor_value_info("idx", TensorProto.INT64, ["N"]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
        initializer=[table],
    )
    _save(graph, path)


def _save(graph: onnx.GraphProto, path: Path) -> None:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))


def _sum_squares(path: Path) -> None:
    """y [N,1] = sum(x * x) over a dynamic second dim: cost grows with the width."""
    graph = helper.make_graph(
        [
            helper.make_node("Mul", ["x", "x"], ["sq"]),
            helper.make_node("ReduceSum", ["sq", "axes"], ["y"], keepdims=1),
        ],
        "sum_squares",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", "K"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 1])],
        initializer=[helper.make_tensor("axes", TensorProto.INT64, [1], [1])],
    )
    _save(graph, path)


MLP_IO = """
input [ { name: "x" data_type: TYPE_FP32 dims: [ 16 ] } ]
output [ { name: "y" data_type: TYPE_FP32 dims: [ 4 ] } ]
"""


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("batching-repo")
    configs = {
        "mlp": f"""max_batch_size: 32
{MLP_IO}
instance_group [ {{ count: 2 kind: KIND_CPU }} ]
dynamic_batching {{ max_queue_delay_microseconds: 2000 }}""",
        "mlp_small_queue": f"""max_batch_size: 4
{MLP_IO}
dynamic_batching {{
  max_queue_delay_microseconds: 1000000
  default_queue_policy {{ max_queue_size: 1 }}
}}""",
        "mlp_priorities": f"""max_batch_size: 4
{MLP_IO}
dynamic_batching {{
  max_queue_delay_microseconds: 300000
  priority_levels: 2
  default_priority_level: 1
  priority_queue_policy {{ key: 2 value: {{ default_timeout_microseconds: 20000 }} }}
  default_queue_policy {{ allow_timeout_override: true }}
}}""",
        "gather": """max_batch_size: 16
dynamic_batching { max_queue_delay_microseconds: 3000 }""",
    }
    configs["ordered"] = """max_batch_size: 8
instance_group [ { count: 2 kind: KIND_CPU } ]
dynamic_batching { preserve_ordering: true }"""
    builders = {"gather": _gather, "ordered": _sum_squares}
    for name, text in configs.items():
        builders.get(name, _mlp)(root / name / "1" / "model.onnx")
        (root / name / "config.pbtxt").write_text(text)
    return root


@pytest.fixture(scope="module")
def server(repo: Path, executor: str) -> Iterator[ServerProcess]:
    s = ServerProcess(repo, [], executor=executor)
    yield s
    s.stop()


def _session(repo: Path, model: str) -> ort.InferenceSession:
    return ort.InferenceSession(
        str(repo / model / "1" / "model.onnx"), providers=["CPUExecutionProvider"]
    )


def _input(x: np.ndarray) -> tc.InferInput:
    i = tc.InferInput("x", list(x.shape), "FP32")
    i.set_data_from_numpy(x)
    return i


def _stats(url: str, model: str) -> tuple[int, int]:
    client = tc.InferenceServerClient(url)
    s = client.get_inference_statistics(model, as_json=True)["model_stats"][0]
    return int(s.get("inference_count", 0)), int(s.get("execution_count", 0))


def test_concurrency_32_batches_and_every_result_is_exact(
    server: ServerProcess, repo: Path
) -> None:
    session = _session(repo, "mlp")
    xs = [RNG.standard_normal((int(RNG.integers(1, 4)), 16)).astype(np.float32) for _ in range(256)]
    before = _stats(server.url, "mlp")

    async def run() -> list[np.ndarray]:
        client = tca.InferenceServerClient(server.url)
        gate = asyncio.Semaphore(32)

        async def one(x: np.ndarray) -> np.ndarray:
            async with gate:
                result = await client.infer("mlp", [_input(x)])
                out = result.as_numpy("y")
                assert out is not None
                return out

        try:
            return await asyncio.gather(*(one(x) for x in xs))
        finally:
            await client.close()

    outs = asyncio.run(run())
    for x, y in zip(xs, outs, strict=True):
        np.testing.assert_allclose(y, session.run(None, {"x": x})[0], rtol=1e-5, atol=1e-5)
    rows, execs = (a - b for a, b in zip(_stats(server.url, "mlp"), before, strict=True))
    assert rows == sum(len(x) for x in xs)
    assert execs < len(xs), "requests were never batched together"


def _pending(server: ServerProcess, model: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{server.http_port}/metrics", timeout=5).read()
    for line in text.decode().splitlines():
        if line.startswith("nv_inference_pending_request_count{") and f'model="{model}"' in line:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_queue_full_is_resource_exhausted(server: ServerProcess) -> None:
    client = tc.InferenceServerClient(server.url)
    done = threading.Event()
    outcome: list[object] = []

    def callback(result: object, error: object) -> None:
        outcome.append(error or result)
        done.set()

    client.async_infer("mlp_small_queue", [_input(np.zeros((1, 16), np.float32))], callback)
    # The first request waits out its 1 s queue delay, filling the queue of one.
    wait_until(
        "mlp_small_queue pending == 1",
        lambda: _pending(server, "mlp_small_queue") == 1,
        timeout_s=10,
        interval_s=0.005,
    )
    with pytest.raises(InferenceServerException) as info:
        client.infer("mlp_small_queue", [_input(np.zeros((1, 16), np.float32))])
    assert info.value.status() == "StatusCode.RESOURCE_EXHAUSTED"
    assert "exceeds maximum queue size" in (info.value.message() or "")
    assert done.wait(10)
    assert not isinstance(outcome[0], Exception), "the queued request must still succeed"


def test_priority_level_timeout_expires_low_priority_only(server: ServerProcess) -> None:
    client = tc.InferenceServerClient(server.url)
    x = np.zeros((1, 16), np.float32)
    with pytest.raises(InferenceServerException) as info:
        client.infer("mlp_priorities", [_input(x)], priority=2)
    assert info.value.status() == "StatusCode.UNAVAILABLE"
    assert "request timeout expired" in info.value.message()
    # Level 1 has no timeout: the same request waits out the delay and succeeds.
    assert client.infer("mlp_priorities", [_input(x)], priority=1).as_numpy("y") is not None


def test_request_timeout_parameter_overrides(server: ServerProcess) -> None:
    client = tc.InferenceServerClient(server.url)
    with pytest.raises(InferenceServerException) as info:
        client.infer("mlp_priorities", [_input(np.zeros((1, 16), np.float32))], timeout=10_000)
    assert info.value.status() == "StatusCode.UNAVAILABLE"
    assert "request timeout expired" in info.value.message()


def test_grpc_deadline_drops_the_request_from_the_queue(server: ServerProcess) -> None:
    client = tc.InferenceServerClient(server.url)
    before = _stats(server.url, "mlp_priorities")
    with pytest.raises(InferenceServerException) as info:
        client.infer("mlp_priorities", [_input(np.zeros((1, 16), np.float32))], client_timeout=0.05)
    assert info.value.status() == "StatusCode.DEADLINE_EXCEEDED"
    # It never ran: no execution was added once the queue delay is long past.
    x = np.ones((1, 16), np.float32)
    client.infer("mlp_priorities", [_input(x)])
    rows, _ = (a - b for a, b in zip(_stats(server.url, "mlp_priorities"), before, strict=True))
    assert rows == 1


def test_batch_larger_than_max_is_invalid(server: ServerProcess) -> None:
    client = tc.InferenceServerClient(server.url)
    with pytest.raises(InferenceServerException) as info:
        client.infer("mlp_small_queue", [_input(np.zeros((5, 16), np.float32))])
    assert info.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "mlp_small_queue" in info.value.message()


def test_a_failing_batch_fails_only_its_requests(server: ServerProcess, repo: Path) -> None:
    session = _session(repo, "gather")

    async def run(bad_every: int) -> list[tuple[bool, np.ndarray | None, str]]:
        client = tca.InferenceServerClient(server.url)

        async def one(i: int) -> tuple[bool, np.ndarray | None, str]:
            bad = bad_every > 0 and i % bad_every == 3
            x = np.full((1, 4), i, np.float32)
            idx = np.array([99 if bad else i % 10], np.int64)
            ins = [tca.InferInput("x", [1, 4], "FP32"), tca.InferInput("idx", [1], "INT64")]
            ins[0].set_data_from_numpy(x)
            ins[1].set_data_from_numpy(idx)
            try:
                r = await client.infer("gather", ins)
            except InferenceServerException as exc:
                return bad, None, exc.status() or ""
            expected = session.run(None, {"x": x, "idx": idx})[0]
            np.testing.assert_array_equal(r.as_numpy("y"), expected)
            return bad, r.as_numpy("y"), ""

        try:
            return await asyncio.gather(*(one(i) for i in range(64)))
        finally:
            await client.close()

    # Mixed: a batch holding a bad request fails as a whole (as in Triton), with
    # INTERNAL for each of its requests; every success is exact.
    results = asyncio.run(run(bad_every=7))
    assert all(out is None for bad, out, _ in results if bad), "a bad index must never succeed"
    assert all(status == "StatusCode.INTERNAL" for _, out, status in results if out is None)
    # The failures left nothing behind: the next batches all succeed.
    assert all(out is not None for _, out, _ in asyncio.run(run(bad_every=0)))
    # Served one at a time, good requests always succeed after a failure.
    client = tc.InferenceServerClient(server.url)
    for idx in (99, 1):
        ins = [tc.InferInput("x", [1, 4], "FP32"), tc.InferInput("idx", [1], "INT64")]
        ins[0].set_data_from_numpy(np.zeros((1, 4), np.float32))
        ins[1].set_data_from_numpy(np.array([idx], np.int64))
        if idx == 99:
            with pytest.raises(InferenceServerException, match="gather"):
                client.infer("gather", ins)
        else:
            np.testing.assert_array_equal(client.infer("gather", ins).as_numpy("y"), [[4, 5, 6, 7]])


def test_preserve_ordering_returns_responses_in_request_order(server: ServerProcess) -> None:
    """Wide (slow) and narrow (fast) requests alternate on two instances; a fast
    one would overtake a slow one unless the scheduler holds it back."""
    received: list[str] = []
    done = threading.Event()
    sent = 12

    def callback(result: object, error: object) -> None:
        assert error is None, error
        assert isinstance(result, tc.InferResult)
        received.append(result.get_response().id)
        if len(received) == sent:
            done.set()

    client = tc.InferenceServerClient(server.url)
    client.start_stream(callback)
    try:
        for i in range(sent):
            width = 2_000_000 if i % 2 == 0 else 1
            x = tc.InferInput("x", [1, width], "FP32")
            x.set_data_from_numpy(np.ones((1, width), np.float32))
            client.async_stream_infer("ordered", [x], request_id=str(i))
        assert done.wait(60)
    finally:
        client.stop_stream()
    assert received == [str(i) for i in range(sent)]


def test_cancelled_call_is_removed_from_the_queue(server: ServerProcess) -> None:
    client = tc.InferenceServerClient(server.url)
    before = _stats(server.url, "mlp_priorities")
    outcome: list[object] = []
    call = client.async_infer(
        "mlp_priorities",
        [_input(np.zeros((1, 16), np.float32))],
        lambda result, error: outcome.append(error or result),
    )
    wait_until(
        "mlp_priorities pending == 1",
        lambda: _pending(server, "mlp_priorities") == 1,
        timeout_s=10,
        interval_s=0.005,
    )  # queued, waiting out its delay
    call.cancel()
    wait_until(
        "mlp_priorities pending == 0",
        lambda: _pending(server, "mlp_priorities") == 0,
        timeout_s=10,
        interval_s=0.005,
    )
    client.infer("mlp_priorities", [_input(np.ones((1, 16), np.float32))])
    rows, _ = (a - b for a, b in zip(_stats(server.url, "mlp_priorities"), before, strict=True))
    assert rows == 1, "the cancelled request must never run"
