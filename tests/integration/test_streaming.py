"""ModelStreamInfer, the high-rate path, in-process and through frontend
processes: every request gets exactly one reply or one error (in-band, the
stream goes on), in request order when the client asks for it, and a client
that never reads is held back instead of growing the server's memory."""

from __future__ import annotations

import queue
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tc
from conftest import ServerProcess, wait_until
from onnx_models import build_scaler
from tritonclient.grpc import service_pb2, service_pb2_grpc

ORDER_HEADER = {"sluice-stream-order": "request"}
WIDE = 16384  # FP32 elements per row: 64 KiB requests and replies

CONFIG = """max_batch_size: 8
input [ { name: "x" data_type: TYPE_FP32 dims: [ %d ] } ]
output [ { name: "y" data_type: TYPE_FP32 dims: [ %d ] } ]
dynamic_batching { max_queue_delay_microseconds: 200 }
"""


def _repo(root: Path) -> Path:
    for name, width in (("scale", 4), ("wide", WIDE)):
        build_scaler(root / name / "1" / "model.onnx", 2.0, width=width)
        (root / name / "config.pbtxt").write_text(CONFIG % (width, width))
    return root


@pytest.fixture(scope="module", params=[1, 2], ids=["in-process", "2-frontends"])
def server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    # The stream path is the frontend's, the same whatever runs the batches:
    # one executor, one server per frontend count for the module.
    repo = _repo(tmp_path_factory.mktemp("streaming"))
    server = ServerProcess(repo, ["--frontends", str(request.param)], executor="thread")
    yield server
    server.stop()


def _request(i: int) -> tuple[str, list[tc.InferInput]]:
    """Request i: mostly good; every 7th has the wrong datatype, every 11th
    names a model that does not exist."""
    model = "missing" if i % 11 == 5 else "scale"
    if i % 7 == 3:
        inp = tc.InferInput("x", [1, 4], "INT32")
        inp.set_data_from_numpy(np.full((1, 4), i, np.int32))
    else:
        inp = tc.InferInput("x", [1, 4], "FP32")
        inp.set_data_from_numpy(np.full((1, 4), i, np.float32))
    return model, [inp]


def _good(i: int) -> bool:
    return not (i % 11 == 5 or i % 7 == 3)


def _run_stream(server: ServerProcess, count: int, headers: dict[str, str] | None) -> list[Any]:
    """Sends `count` requests on one stream; returns the callbacks' (result,
    error) pairs in the order they arrived."""
    replies: list[Any] = []
    done = threading.Event()

    def callback(result: Any, error: Any) -> None:
        replies.append((result, error))
        if len(replies) == count:
            done.set()

    client = tc.InferenceServerClient(server.url)
    client.start_stream(callback, headers=headers)
    try:
        for i in range(count):
            model, inputs = _request(i)
            client.async_stream_infer(model, inputs, request_id=str(i))
        assert done.wait(120), f"{len(replies)} of {count} replies"
    finally:
        client.stop_stream()
        client.close()
    assert len(replies) == count  # and no more once the stream closed
    return replies


def test_ten_thousand_mixed_requests_in_request_order(server: ServerProcess) -> None:
    count = 10_000
    replies = _run_stream(server, count, ORDER_HEADER)
    for i, (result, error) in enumerate(replies):
        if _good(i):
            assert error is None, (i, error)
            assert result.get_response().id == str(i)
            assert result.as_numpy("y").tolist() == [[2.0 * i] * 4]
        else:
            assert result is None, i
            expected = "missing" if i % 11 == 5 else "INT32"
            assert expected in str(error), (i, error)


def test_ten_thousand_mixed_requests_as_they_finish(server: ServerProcess) -> None:
    count = 10_000
    replies = _run_stream(server, count, None)
    ids = [int(r.get_response().id) for r, e in replies if e is None]
    assert sorted(ids) == [i for i in range(count) if _good(i)]  # each exactly once
    for result, error in replies:
        if error is None:
            i = int(result.get_response().id)
            assert result.as_numpy("y").tolist() == [[2.0 * i] * 4]
    assert sum(1 for _, e in replies if e is not None) == sum(
        1 for i in range(count) if not _good(i)
    )


def _answered(server: ServerProcess) -> float:
    url = f"http://127.0.0.1:{server.http_port}/metrics"
    for line in urllib.request.urlopen(url, timeout=5).read().decode().splitlines():
        if line.startswith('nv_inference_request_success{model="wide"'):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_a_client_that_never_reads_is_held_back(server: ServerProcess) -> None:
    """3,000 requests of 64 KiB (and as many 64 KiB replies) on one stream whose
    client reads nothing: the server answers its window (256) and then stops
    reading, so the client cannot send everything; once it reads, every
    request is answered exactly once."""
    count = 3000
    sent = [0]
    far_ahead = threading.Event()
    row = np.ones((1, WIDE), np.float32).tobytes()

    def requests() -> Iterator[service_pb2.ModelInferRequest]:
        for i in range(count):
            msg = service_pb2.ModelInferRequest(model_name="wide", id=str(i))
            msg.inputs.add(name="x", datatype="FP32", shape=[1, WIDE])
            msg.raw_input_contents.append(row)
            yield msg
            sent[0] += 1
            if sent[0] >= 1500:
                far_ahead.set()

    channel = grpc.insecure_channel(
        server.url, options=[("grpc.max_receive_message_length", 1 << 26)]
    )
    try:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        replies = stub.ModelStreamInfer(requests())  # read nothing yet
        wait_until("the window's worth of answers", lambda: _answered(server) >= 256)
        # Not reading, the client is held back: it never gets far ahead.
        assert not far_ahead.wait(3.0), f"the client sent {sent[0]} requests unread"
        assert _answered(server) < 1500
        ids: queue.SimpleQueue[str] = queue.SimpleQueue()
        for reply in replies:
            assert not reply.error_message, reply.error_message
            ids.put(reply.infer_response.id)
            if ids.qsize() == count:
                break
        got = sorted(int(ids.get()) for _ in range(ids.qsize()))
        assert got == list(range(count))
        replies.cancel()
    finally:
        channel.close()
