"""Version swaps under load: poll-mode publish, explicit load, rollback and a
corrupt version, each with zero failed requests while tritonclient keeps 16
requests in flight, and every response from a version that was ready."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import onnx
import pytest
import tritonclient.grpc as tc
import tritonclient.grpc.aio as tca
from conftest import ServerProcess, wait_until
from onnx import TensorProto, helper
from tritonclient.utils import InferenceServerException

MODEL = "scaler"
CONFIG = """max_batch_size: 8
input [ { name: "x" data_type: TYPE_FP32 dims: [ 4 ] } ]
output [ { name: "y" data_type: TYPE_FP32 dims: [ 4 ] } ]
dynamic_batching { max_queue_delay_microseconds: 200 }
"""


def _scaler(path: Path, factor: float) -> None:
    """y = x * factor: the output tells which version answered."""
    graph = helper.make_graph(
        [helper.make_node("Mul", ["x", "k"], ["y"])],
        "scaler",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
        initializer=[helper.make_tensor("k", TensorProto.FLOAT, [], [factor])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))


def publish(repo: Path, version: int, corrupt: bool = False) -> None:
    """Writes the version beside the model, then renames it in: never half-visible."""
    staging = repo / MODEL / f".staging-{version}"
    if corrupt:
        staging.mkdir(parents=True)
        (staging / "model.onnx").write_bytes(os.urandom(512))
    else:
        _scaler(staging / "model.onnx", float(version))
    staging.rename(repo / MODEL / str(version))


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    _scaler(tmp_path / MODEL / "1" / "model.onnx", 1.0)
    (tmp_path / MODEL / "config.pbtxt").write_text(CONFIG)
    return tmp_path


class Load:
    """16 requests in flight until stopped; records every outcome."""

    def __init__(self, url: str, concurrency: int = 16) -> None:
        self.url = url
        self.concurrency = concurrency
        self.ok: list[tuple[str, float]] = []  # (version, latency s)
        self.failures: list[str] = []
        self.mismatches: list[str] = []
        self.seen: dict[str, threading.Event] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)

    def saw(self, version: str) -> threading.Event:
        return self.seen.setdefault(version, threading.Event())

    def __enter__(self) -> Load:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(60)

    async def _run(self) -> None:
        client = tca.InferenceServerClient(self.url)
        x = np.arange(8, dtype=np.float32).reshape(2, 4) + 1

        async def worker() -> None:
            while not self._stop.is_set():
                inp = tca.InferInput("x", [2, 4], "FP32")
                inp.set_data_from_numpy(x)
                started = time.perf_counter()
                try:
                    r = await client.infer(MODEL, [inp])
                except InferenceServerException as exc:
                    self.failures.append(f"{exc.status()}: {exc.message()}")
                    continue
                version = r.get_response().model_version
                y = r.as_numpy("y")
                if y is None or not np.array_equal(y, x * float(version)):
                    self.mismatches.append(version)
                self.ok.append((version, time.perf_counter() - started))
                self.saw(version).set()

        try:
            await asyncio.gather(*(worker() for _ in range(self.concurrency)))
        finally:
            await client.close()

    def p99_ms(self) -> float:
        return float(np.percentile([s for _, s in self.ok], 99) * 1000)


def _wait(event: threading.Event, what: str, timeout_s: float = 60) -> None:
    assert event.wait(timeout_s), f"timed out waiting for {what}"


def _index(url: str) -> dict[tuple[str, str], tuple[str, str]]:
    entries = tc.InferenceServerClient(url).get_model_repository_index(as_json=True)["models"]
    return {(e["name"], e.get("version", "")): (e["state"], e.get("reason", "")) for e in entries}


def test_publish_in_poll_mode_then_rollback_with_zero_failures(
    repo: Path, start_server: Callable[..., ServerProcess]
) -> None:
    server = start_server(repo, "--model-control-mode", "poll", "--repository-poll-secs", "0.1")
    with Load(server.url) as load:
        _wait(load.saw("1"), "version 1 to answer")
        publish(repo, 2)
        _wait(load.saw("2"), "version 2 to take over")
        load.seen.pop("1")
        shutil.rmtree(repo / MODEL / "2")  # roll back: the policy selects version 1 again
        _wait(load.saw("1"), "version 1 to come back")
    assert load.failures == []
    assert load.mismatches == []
    assert {v for v, _ in load.ok} == {"1", "2"}
    print(f"poll publish + rollback: {len(load.ok)} requests, p99 {load.p99_ms():.1f} ms")
    # Version 2's folder is gone: the index settles on version 1 alone.
    wait_until(
        "the index to show only version 1, READY",
        lambda: {k: v[0] for k, v in _index(server.url).items()} == {(MODEL, "1"): "READY"},
    )


def test_explicit_load_swaps_and_unload_drains(
    repo: Path, start_server: Callable[..., ServerProcess]
) -> None:
    server = start_server(repo, "--model-control-mode", "explicit", "--load-model", MODEL)
    client = tc.InferenceServerClient(server.url)
    with Load(server.url) as load:
        _wait(load.saw("1"), "version 1 to answer")
        publish(repo, 2)
        client.load_model(MODEL)  # returns once version 2 serves
        assert client.is_model_ready(MODEL, "2")
        _wait(load.saw("2"), "version 2 to answer")
    assert load.failures == []
    assert load.mismatches == []
    print(f"explicit swap: {len(load.ok)} requests, p99 {load.p99_ms():.1f} ms")
    assert not client.is_model_ready(MODEL, "1")  # version 1 was drained and unloaded
    client.unload_model(MODEL)
    assert not client.is_model_ready(MODEL)
    inp = tc.InferInput("x", [1, 4], "FP32")
    inp.set_data_from_numpy(np.ones((1, 4), np.float32))
    with pytest.raises(InferenceServerException) as info:
        client.infer(MODEL, [inp])
    assert info.value.status() == "StatusCode.UNAVAILABLE"
    assert _index(server.url)[(MODEL, "")] == ("UNAVAILABLE", "unloaded")


def test_explicit_load_with_config_override(
    repo: Path, start_server: Callable[..., ServerProcess]
) -> None:
    server = start_server(repo, "--model-control-mode", "explicit")
    client = tc.InferenceServerClient(server.url)
    assert not client.is_model_ready(MODEL)
    override = {
        "max_batch_size": 2,
        "input": [{"name": "x", "data_type": "TYPE_FP32", "dims": [4]}],
        "output": [{"name": "y", "data_type": "TYPE_FP32", "dims": [4]}],
    }
    client.load_model(MODEL, config=json.dumps(override))
    assert client.get_model_config(MODEL).config.max_batch_size == 2
    with pytest.raises(InferenceServerException, match="not a valid JSON ModelConfig"):
        client.load_model(MODEL, config="{not json")


def test_load_and_unload_are_refused_outside_explicit_mode(
    repo: Path, start_server: Callable[..., ServerProcess]
) -> None:
    client = tc.InferenceServerClient(start_server(repo).url)
    with pytest.raises(InferenceServerException) as info:
        client.unload_model(MODEL)
    assert info.value.status() == "StatusCode.UNAVAILABLE"
    assert "explicit" in (info.value.message() or "")
    assert client.is_model_ready(MODEL)


def test_corrupt_version_never_loads_and_the_previous_keeps_serving(
    repo: Path, start_server: Callable[..., ServerProcess]
) -> None:
    server = start_server(repo, "--model-control-mode", "poll", "--repository-poll-secs", "0.1")
    with Load(server.url) as load:
        _wait(load.saw("1"), "version 1 to answer")
        publish(repo, 2, corrupt=True)
        wait_until(
            "the poll to list version 2 in the index",
            lambda: (MODEL, "2") in _index(server.url),
            interval_s=0.05,
        )
        served_after = len(load.ok)
        wait_until("more answers after the failure", lambda: len(load.ok) > served_after + 50)
    state, reason = _index(server.url)[(MODEL, "2")]
    assert state == "UNAVAILABLE"
    assert "onnxruntime cannot load" in reason
    assert _index(server.url)[(MODEL, "1")][0] == "READY"
    assert load.failures == []
    assert {v for v, _ in load.ok} == {"1"}
    assert "version 2 failed to load" in server.log


@pytest.fixture(autouse=True)
def _no_leftover_staging(repo: Path) -> Iterator[None]:
    yield
    assert not list((repo / MODEL).glob(".staging-*"))
