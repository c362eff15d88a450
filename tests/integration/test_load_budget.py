"""Loads have a time budget and never hold the server (issue 15, item 2's rule
"loads and warm-ups have a timeout and cannot block shutdown").

Two real models that never finish loading within any budget a test can wait
for, both a few hundred bytes:
- `creating`: onnxruntime's constant folding multiplies 1024x1024 matrices
  thousands of times while it creates the session (minutes of CPU);
- `warming`: a Loop of 2^62 iterations, which the generated warm-up runs.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import psutil
import pytest
import tritonclient.grpc as tc
from conftest import ServerProcess, wait_until
from onnx import TensorProto, helper
from tritonclient.utils import InferenceServerException

GOOD = """max_batch_size: 8
input [ { name: "x" data_type: TYPE_FP32 dims: [ 4 ] } ]
output [ { name: "y" data_type: TYPE_FP32 dims: [ 4 ] } ]
"""
# One intra-op thread: an abandoned load in a thread burns one core, not all.
ONE_THREAD = 'parameters { key: "intra_op_thread_count" value { string_value: "1" } }\n'


def _save(graph: onnx.GraphProto, path: Path) -> None:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))


def _io() -> tuple[onnx.ValueInfoProto, onnx.ValueInfoProto]:
    return (
        helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4]),
        helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4]),
    )


def identity(path: Path) -> None:
    x, y = _io()
    _save(helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "id", [x], [y]), path)


def slow_to_create(path: Path, matmuls: int = 5000, size: int = 1024) -> None:
    """y = x + sum(C^k): C is a constant, so onnxruntime folds the whole chain
    while it creates the session (~0.1 s per MatMul here): a session creation
    that takes minutes, from a file of a few hundred bytes."""
    value = helper.make_tensor("v", TensorProto.FLOAT, [1], [1e-3])
    nodes = [helper.make_node("ConstantOfShape", ["shape"], ["c0"], value=value)]
    for i in range(matmuls):
        nodes.append(helper.make_node("MatMul", [f"c{i}", "c0"], [f"c{i + 1}"]))
    nodes.append(helper.make_node("ReduceSum", [f"c{matmuls}"], ["s"], keepdims=0))
    nodes.append(helper.make_node("Add", ["x", "s"], ["y"]))
    shape = helper.make_tensor("shape", TensorProto.INT64, [2], [size, size])
    x, y = _io()
    _save(helper.make_graph(nodes, "creating", [x], [y], [shape]), path)


def never_warm(path: Path) -> None:
    """y = x + 2^62 (a Loop adding 1 that many times): loads at once; the
    warm-up request runs for ever unless onnxruntime is told to terminate."""
    body = helper.make_graph(
        [
            helper.make_node("Identity", ["cond_in"], ["cond_out"]),
            helper.make_node("Add", ["v_in", "one"], ["v_out"]),
        ],
        "body",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("v_in", TensorProto.FLOAT, ["N", 4]),
        ],
        [
            helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("v_out", TensorProto.FLOAT, ["N", 4]),
        ],
        [helper.make_tensor("one", TensorProto.FLOAT, [1], [1.0])],
    )
    x, y = _io()
    _save(
        helper.make_graph(
            [helper.make_node("Loop", ["trips", "cond", "x"], ["y"], body=body)],
            "warming",
            [x],
            [y],
            [
                helper.make_tensor("trips", TensorProto.INT64, [], [1 << 62]),
                helper.make_tensor("cond", TensorProto.BOOL, [], [True]),
            ],
        ),
        path,
    )


def repository(root: Path) -> Path:
    repo = root / "repo"
    identity(repo / "good" / "1" / "model.onnx")
    (repo / "good" / "config.pbtxt").write_text(GOOD)
    slow_to_create(repo / "creating" / "1" / "model.onnx")
    (repo / "creating" / "config.pbtxt").write_text(GOOD + ONE_THREAD)
    never_warm(repo / "warming" / "1" / "model.onnx")
    (repo / "warming" / "config.pbtxt").write_text(GOOD + ONE_THREAD)
    return repo


def _infer_ok(client: tc.InferenceServerClient) -> None:
    x = tc.InferInput("x", [1, 4], "FP32")
    x.set_data_from_numpy(np.arange(4, dtype=np.float32).reshape(1, 4))
    y = client.infer("good", [x]).as_numpy("y")
    assert y is not None
    assert y.tolist() == [[0.0, 1.0, 2.0, 3.0]]


def _load_error(client: tc.InferenceServerClient, name: str) -> tuple[str, str, float]:
    started = time.monotonic()
    with pytest.raises(InferenceServerException) as err:
        client.load_model(name, client_timeout=120)
    return str(err.value.status()), str(err.value.message()), time.monotonic() - started


def _executor_children(pid: int, model: str) -> list[psutil.Process]:
    found = []
    for child in psutil.Process(pid).children(recursive=True):
        try:
            if any(f"{model}/1#" in part for part in child.cmdline()):
                found.append(child)
        except psutil.NoSuchProcess:
            continue
    return found


def test_loads_past_their_budget_are_unavailable_and_the_server_goes_on(
    tmp_path: Path, start_server: Callable[..., ServerProcess], executor: str
) -> None:
    repo = repository(tmp_path)
    # The budget must fit a healthy executor process's start-up on a busy machine.
    budget_s = 4 if executor == "thread" else 15
    server = start_server(
        repo,
        "--model-control-mode",
        "explicit",
        "--load-model",
        "good",
        "--model-load-timeout-secs",
        str(budget_s),
    )
    client = tc.InferenceServerClient(server.url)
    _infer_ok(client)
    for name in ("creating", "warming"):
        status, message, took_s = _load_error(client, name)
        assert status == "StatusCode.UNAVAILABLE", message
        assert f"longer than its {budget_s} s budget (--model-load-timeout-secs)" in message
        assert took_s < budget_s + 30
        assert not client.is_model_ready(name)
        _infer_ok(client)  # the server went on serving throughout
    index = {m["name"]: m for m in client.get_model_repository_index(as_json=True)["models"]}
    assert "budget" in index["creating"]["reason"]
    if executor == "process":
        # The children of abandoned loads were killed; none is left behind.
        for name in ("creating", "warming"):
            wait_until(
                f"no executor process of {name}",
                lambda n=name: not _executor_children(server.proc.pid, n),
            )  # type: ignore[misc]
    else:
        # The warm-up run was told to terminate: its thread ended on its own.
        wait_until(
            "the abandoned warm-up to end",
            lambda: "model 'warming' version 1: abandoned load ended" in server.log,
        )
        # Session creation cannot be interrupted: the same version is not loaded
        # again while its first load still runs.
        status, message, took_s = _load_error(client, "creating")
        assert "is still running" in message, message
        assert took_s < budget_s
    _infer_ok(client)
    # SIGTERM completes, though a session creation may still run in a thread.
    started = time.monotonic()
    assert server.stop(signal.SIGTERM, timeout_s=60) == 0, server.log[-3000:]
    assert time.monotonic() - started < 30
    if executor == "thread":  # it left without finalizing under the running thread
        assert "1 abandoned model load(s) still running in a thread" in server.log


def test_sigterm_during_a_load_that_never_ends_exits_at_once(tmp_path: Path, executor: str) -> None:
    """No budget set (the 600 s default): the initial load of `creating` holds
    start-up, and SIGTERM still ends the server promptly with status 0."""
    repo = repository(tmp_path)
    (repo / "warming").rename(tmp_path / "warming-aside")
    cmd = [sys.executable, "-m", "sluice.cli", "--log-level", "INFO", "serve"]
    cmd += ["--grpc-port", "0", "--http-port", "0", "--executor", executor]
    cmd += ["--model-repository", str(repo)]
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=dict(os.environ, PYTHONUNBUFFERED="1"),
    )
    lines: list[str] = []
    loading = threading.Event()

    def read() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            lines.append(line)
            if re.search(r"model 'creating' version 1 loading", line):
                loading.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert loading.wait(60), "".join(lines[-40:])
        if executor == "process":  # its child is running the session creation
            wait_until("the executor process", lambda: _executor_children(proc.pid, "creating"))
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(60)
        took_s = time.monotonic() - started
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        reader.join(5)
        out = proc.stdout.read() if proc.stdout is not None else ""
        for pipe in (proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()
    assert rc == 0, "".join(lines[-40:])
    assert took_s < 30
    assert "ready: grpc" not in out  # it never became ready: the load was still running
    assert any("stopping during the initial load" in line for line in lines)
