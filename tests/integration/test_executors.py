"""Executors on a real server: a crashed executor process fails only its
in-flight batch and comes back; a model whose config cannot be used is
UNAVAILABLE with the reason while the others serve."""

from __future__ import annotations

import signal
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import psutil
import pytest
import tritonclient.grpc as tc
from conftest import ServerProcess, wait_until
from test_rollout import CONFIG, metric, scaler
from tritonclient.utils import InferenceServerException

SLOW_CONFIG = CONFIG.replace("version_policy: { all: {} }\n", "") + (
    "dynamic_batching { max_queue_delay_microseconds: 2000 }\n"
)


def _repo(root: Path, models: dict[str, str]) -> Path:
    for name, config in models.items():
        scaler(root / name / "1" / "model.onnx", 2.0)
        (root / name / "config.pbtxt").write_text(config)
    return root


def _infer(client: tc.InferenceServerClient, model: str) -> np.ndarray:
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    inp = tc.InferInput("x", [2, 4], "FP32")
    inp.set_data_from_numpy(x)
    y = client.infer(model, [inp], client_timeout=30).as_numpy("y")
    assert y is not None
    return y


def _children(server: ServerProcess, model: str) -> list[psutil.Process]:
    """The model's live executor processes (their last argument names them)."""
    found = []
    for p in psutil.Process(server.proc.pid).children():
        try:
            cmdline = p.cmdline()
        except psutil.Error:  # exited, or a zombie not reaped yet
            continue
        if "sluice.executors.child" in cmdline and cmdline[-1].startswith(f"{model}/"):
            found.append(p)
    return found


def test_killed_executor_fails_only_its_batch_and_comes_back(
    tmp_path: Path, start_server: Callable[..., ServerProcess], executor: str
) -> None:
    if executor != "process":
        pytest.skip("only process executors run in a child that can be killed")
    repo = _repo(tmp_path, {"victim": SLOW_CONFIG, "bystander": SLOW_CONFIG})
    server = start_server(repo)
    [child] = _children(server, "victim")
    stop = threading.Event()
    outcomes: dict[str, Counter[str]] = {"victim": Counter(), "bystander": Counter()}
    messages: list[str] = []
    answered = threading.Condition()  # the load threads notify it after every answer

    def load(model: str) -> None:
        client = tc.InferenceServerClient(server.url)
        while not stop.is_set():
            try:
                y = _infer(client, model)
                assert np.array_equal(y, 2 * np.arange(8, dtype=np.float32).reshape(2, 4))
                result, message = "ok", None
            except InferenceServerException as exc:
                result, message = exc.status() or "?", exc.message() or ""
            with answered:
                outcomes[model][result] += 1
                if message is not None:
                    messages.append(message)
                answered.notify_all()

    def wait_for_answers(what: str, done: Callable[[], bool], timeout_s: float) -> None:
        with answered:
            assert answered.wait_for(done, timeout=timeout_s), (what, outcomes)

    threads = [
        threading.Thread(target=load, args=(m,)) for m in ("victim",) * 8 + ("bystander",) * 8
    ]
    for t in threads:
        t.start()
    try:
        wait_for_answers(
            "traffic on both models",
            lambda: min(outcomes["victim"]["ok"], outcomes["bystander"]["ok"]) >= 50,
            timeout_s=30,
        )
        child.send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
        # The instance comes back: a new child, READY, and requests succeed again.
        client = tc.InferenceServerClient(server.url)
        wait_until(
            "a new victim executor, READY",
            lambda: (
                any(p.pid != child.pid for p in _children(server, "victim"))
                and client.is_model_ready("victim")
            ),
            timeout_s=5,
        )
        with answered:
            before = outcomes["victim"]["ok"]
        wait_for_answers(
            "20 more answers from the victim",
            lambda: outcomes["victim"]["ok"] >= before + 20,
            timeout_s=max(0.0, 5 - (time.monotonic() - killed_at)),
        )
    finally:
        stop.set()
        for t in threads:
            t.join()
    failed = {k: v for k, v in outcomes["victim"].items() if k != "ok"}
    # Only the batch in flight failed: at most the 8 requests one batch can hold.
    assert set(failed) <= {"StatusCode.UNAVAILABLE"}, (failed, messages[:3])
    assert 0 < sum(failed.values()) <= 8, outcomes
    assert all("'victim' version 1 instance 0" in m and "died" in m for m in messages), messages
    assert outcomes["bystander"].keys() == {"ok"}, outcomes
    assert metric(server, "sluice_executor_restarts_total", model="victim") == 1
    assert metric(server, "sluice_executor_restarts_total", model="bystander") == 0
    assert "executor process died (killed by SIGKILL)" in server.log


def test_unusable_config_value_fails_only_that_model(
    tmp_path: Path, start_server: Callable[..., ServerProcess]
) -> None:
    bad = CONFIG.replace("version_policy: { all: {} }\n", "") + (
        'parameters { key: "intra_op_thread_count" value { string_value: "two" } }\n'
    )
    repo = _repo(tmp_path, {"broken": bad, "fine": SLOW_CONFIG})
    server = start_server(repo)
    client = tc.InferenceServerClient(server.url)
    assert not client.is_model_ready("broken")
    index = {m["name"]: m for m in client.get_model_repository_index(as_json=True)["models"]}
    assert index["broken"]["state"] == "UNAVAILABLE"
    assert "intra_op_thread_count" in index["broken"]["reason"]
    assert "'two'" in index["broken"]["reason"]
    assert np.array_equal(_infer(client, "fine"), 2 * np.arange(8, dtype=np.float32).reshape(2, 4))
    with pytest.raises(InferenceServerException) as info:
        _infer(client, "broken")
    assert info.value.status() == "StatusCode.UNAVAILABLE"
    assert index["fine"]["state"] == "READY"
    assert server.proc.poll() is None  # the server kept running
