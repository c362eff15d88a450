"""Progressive delivery on a real server: the canary split follows its weight,
sticky ids stay on one arm, a shadow never changes a response, and the guards
roll back a faulty canary (wrong outputs, or slow) but not a healthy one."""

from __future__ import annotations

import json
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import tritonclient.grpc as tc
from conftest import ServerProcess, wait_until
from onnx import TensorProto, helper
from tritonclient.utils import InferenceServerException

MODEL = "scaler"
DASHBOARD = Path(__file__).resolve().parents[2] / "docker" / "grafana" / "sluice-dashboard.json"
CONFIG = """max_batch_size: 8
input [ { name: "x" data_type: TYPE_FP32 dims: [ 4 ] } ]
output [ { name: "y" data_type: TYPE_FP32 dims: [ 4 ] } ]
version_policy: { all: {} }
"""


def _save(graph: onnx.GraphProto, path: Path) -> None:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))


def _io() -> tuple[list[onnx.ValueInfoProto], list[onnx.ValueInfoProto]]:
    return (
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
    )


def scaler(path: Path, factor: float) -> None:
    """y = x * factor."""
    ins, outs = _io()
    k = helper.make_tensor("k", TensorProto.FLOAT, [], [factor])
    _save(
        helper.make_graph([helper.make_node("Mul", ["x", "k"], ["y"])], "s", ins, outs, [k]), path
    )


def healthy_rewrite(path: Path) -> None:
    """Same outputs as scaler(1) through a different graph: y = (x + 1) - 1."""
    ins, outs = _io()
    one = helper.make_tensor("one", TensorProto.FLOAT, [], [1.0])
    nodes = [
        helper.make_node("Add", ["x", "one"], ["t"]),
        helper.make_node("Sub", ["t", "one"], ["y"]),
    ]
    _save(helper.make_graph(nodes, "h", ins, outs, [one]), path)


def slow_identity(path: Path) -> None:
    """y = x + 0 * sum(x @ W1 @ W2 @ W2 ...): correct outputs, tens of times slower
    than stable (the chain depends on the input, so nothing folds away)."""
    ins, outs = _io()
    rng = np.random.default_rng(0)
    w1 = helper.make_tensor("w1", TensorProto.FLOAT, [4, 1024], rng.random(4096, np.float32))
    # Small weights keep the chain finite (0 * inf would be NaN, not 0).
    w2 = helper.make_tensor(
        "w2", TensorProto.FLOAT, [1024, 1024], rng.random(1024 * 1024, np.float32) / 1024
    )
    zero = helper.make_tensor("zero", TensorProto.FLOAT, [], [0.0])
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h0"]),
        *(helper.make_node("MatMul", [f"h{i}", "w2"], [f"h{i + 1}"]) for i in range(64)),
        helper.make_node("ReduceSum", ["h64"], ["s"], keepdims=1),
        helper.make_node("Mul", ["s", "zero"], ["z"]),
        helper.make_node("Add", ["x", "z"], ["y"]),
    ]
    _save(helper.make_graph(nodes, "slow", ins, outs, [w1, w2, zero]), path)


def make_repo(
    root: Path, candidate: Callable[[Path], None], labels: dict, config: str = CONFIG
) -> Path:
    scaler(root / MODEL / "1" / "model.onnx", 1.0)
    candidate(root / MODEL / "2" / "model.onnx")
    (root / MODEL / "config.pbtxt").write_text(config)
    (root / MODEL / "labels.json").write_text(json.dumps(labels))
    return root


def infer(
    client: tc.InferenceServerClient, x: np.ndarray, request_id: str = ""
) -> tuple[str, np.ndarray]:
    inp = tc.InferInput("x", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    r = client.infer(MODEL, [inp], request_id=request_id)
    y = r.as_numpy("y")
    assert y is not None
    return r.get_response().model_version, y


def metric(server: ServerProcess, name: str, **labels: str) -> float:
    body = urllib.request.urlopen(f"http://127.0.0.1:{server.http_port}/metrics", timeout=5)
    for line in body.read().decode().splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def assert_on_dashboard(server: ServerProcess, name: str, label: str) -> None:
    """The Grafana dashboard queries `name` grouped by `label`, and the server
    exposes that series with that label (test_prometheus.py exempts the rollout
    families, which have samples only while a rollout runs)."""
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [
        t["expr"]
        for p in dashboard["panels"]
        for t in p.get("targets", [])
        if name in t.get("expr", "")
    ]
    assert any(f"{label})" in e or f"{label}," in e for e in exprs), (name, exprs)
    body = urllib.request.urlopen(f"http://127.0.0.1:{server.http_port}/metrics", timeout=5)
    lines = [ln for ln in body.read().decode().splitlines() if ln.startswith(name + "{")]
    assert any(f'{label}="' in ln for ln in lines), (name, lines)


def test_canary_split_follows_its_weight_and_a_healthy_canary_stays(
    tmp_path: Path, start_server: Callable[..., ServerProcess]
) -> None:
    labels = {"stable": 1, "canary": {"version": 2, "weight": 0.3}}
    server = start_server(make_repo(tmp_path, healthy_rewrite, labels))
    client = tc.InferenceServerClient(server.url)
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    n = 600
    arms = Counter(infer(client, x)[0] for _ in range(n))
    assert set(arms) == {"1", "2"}
    # Binomial(600, 0.3): mean 180, sd 11.2; 5 sd either side.
    assert abs(arms["2"] - 0.3 * n) < 5 * (n * 0.3 * 0.7) ** 0.5, arms
    assert metric(server, "sluice_rollout_requests_total", version="2", arm="canary") == arms["2"]
    # Every canary request was compared with stable in the background; all agreed.
    assert json.loads((tmp_path / MODEL / "labels.json").read_text())["canary"]["version"] == 2
    assert metric(server, "sluice_canary_rollbacks_total") == 0
    # Explicit versions bypass the rollout: each request lands where it asked.
    for version in ("1", "2") * 5:
        inp = tc.InferInput("x", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        assert client.infer(MODEL, [inp], model_version=version).get_response().model_version == (
            version
        )


def test_sticky_canary_keeps_each_request_id_on_one_arm(
    tmp_path: Path, start_server: Callable[..., ServerProcess]
) -> None:
    labels = {"stable": 1, "canary": {"version": 2, "weight": 0.5, "sticky": True}}
    client = tc.InferenceServerClient(
        start_server(make_repo(tmp_path, healthy_rewrite, labels)).url
    )
    x = np.ones((1, 4), np.float32)
    for rid in ("alice", "bob", "carol", "dave", "erin", "frank"):
        assert len({infer(client, x, rid)[0] for _ in range(8)}) == 1, rid


def test_shadow_never_changes_a_response(
    tmp_path: Path, start_server: Callable[..., ServerProcess]
) -> None:
    labels = {"stable": 1, "shadow": {"version": 2, "sample": 1.0}}
    server = start_server(make_repo(tmp_path, lambda p: scaler(p, 3.0), labels))
    client = tc.InferenceServerClient(server.url)
    x = np.arange(4, dtype=np.float32).reshape(1, 4) + 1
    for _ in range(40):
        version, y = infer(client, x)
        assert version == "1"
        np.testing.assert_array_equal(y, x)  # never the shadow's x * 3
    wait_until(
        "every mirrored request to be compared",
        lambda: (
            metric(server, "sluice_shadow_comparisons_total", version="2", result="disagree") == 40
        ),
    )
    assert_on_dashboard(server, "sluice_shadow_comparisons_total", "result")
    assert_on_dashboard(server, "sluice_rollout_requests_total", "arm")


@pytest.mark.parametrize(
    ("candidate", "guard"),
    [(lambda p: scaler(p, 2.0), "outputs"), (slow_identity, "p99")],
    ids=["wrong-outputs", "slow"],
)
def test_guards_roll_a_faulty_canary_back(
    tmp_path: Path,
    start_server: Callable[..., ServerProcess],
    candidate: Callable[[Path], None],
    guard: str,
) -> None:
    labels = {"stable": 1, "canary": {"version": 2, "weight": 0.5}}
    server = start_server(make_repo(tmp_path, candidate, labels))
    client = tc.InferenceServerClient(server.url)
    x = np.ones((1, 4), np.float32)
    deadline = time.monotonic() + 120
    while metric(server, "sluice_canary_rollbacks_total", version="2") < 1:
        assert time.monotonic() < deadline, "no guard fired"
        # Scrape between bursts, not between requests: a scrape running beside
        # the background mirrors would add its own time to stable's latency.
        for _ in range(25):
            infer(client, x)
    assert metric(server, "sluice_canary_rollbacks_total", version="2", guard=guard) == 1
    assert_on_dashboard(server, "sluice_canary_rollbacks_total", "guard")
    # Rolled back: unversioned traffic is all stable again, and the file says why.
    assert {infer(client, x)[0] for _ in range(30)} == {"1"}

    # The server records the rollback in labels.json off its loop, after routing
    # changed; the file is replaced atomically, so every read is a whole file.
    def recorded() -> dict[str, Any] | None:
        data: dict[str, Any] = json.loads((tmp_path / MODEL / "labels.json").read_text())
        return data if data.get("history") else None

    written = wait_until("labels.json to record the rollback", recorded)
    assert "canary" not in written
    last = written["history"][-1]
    assert (last["label"], last["version"], last["action"]) == ("canary", 2, "auto-rollback")
    assert last["detail"].startswith(guard)
    assert "rolling canary version 2 back automatically" in server.log


def test_rollout_rpc_sets_and_clears_a_canary(
    tmp_path: Path, start_server: Callable[..., ServerProcess]
) -> None:
    import grpc
    from sluice.proto import sluice_service_pb2 as spb
    from sluice.proto import sluice_service_pb2_grpc as spb_grpc

    server = start_server(make_repo(tmp_path, lambda p: scaler(p, 2.0), {"stable": 1}))
    stub = spb_grpc.SluiceServiceStub(grpc.insecure_channel(server.url))
    client = tc.InferenceServerClient(server.url)
    x = np.ones((1, 4), np.float32)
    assert {infer(client, x)[0] for _ in range(10)} == {"1"}

    rollout = stub.SetRollout(
        spb.SetRolloutRequest(model_name=MODEL, canary=spb.Canary(version=2, weight=1.0))
    )
    assert (rollout.stable_version, rollout.canary.version) == (1, 2)
    assert {infer(client, x)[0] for _ in range(10)} == {"2"}  # fewer than the guard's minimum
    assert json.loads((tmp_path / MODEL / "labels.json").read_text())["canary"]["weight"] == 1.0
    assert stub.GetRollout(spb.GetRolloutRequest(model_name=MODEL)).canary.version == 2

    stub.SetRollout(spb.SetRolloutRequest(model_name=MODEL, clear_canary=True))
    assert {infer(client, x)[0] for _ in range(10)} == {"1"}

    for bad, code in (
        (spb.SetRolloutRequest(model_name=MODEL, canary=spb.Canary(version=2, weight=1.5)),
         grpc.StatusCode.INVALID_ARGUMENT),
        (spb.SetRolloutRequest(model_name=MODEL, canary=spb.Canary(version=9, weight=0.1)),
         grpc.StatusCode.INVALID_ARGUMENT),
        (spb.SetRolloutRequest(model_name="nope", clear_canary=True), grpc.StatusCode.NOT_FOUND),
    ):  # fmt: skip
        with pytest.raises(grpc.RpcError) as info:
            stub.SetRollout(bad)
        assert info.value.code() == code, info.value.details()


def broken_at_runtime(path: Path) -> None:
    """Loads and warms up with one row, then fails every batch of more rows:
    y = Reshape(x, [1, 4]), the target computed from x's shape at run time
    (Shape(x) * [0, 1] + [1, 0]) so that loading cannot see it coming."""
    ins, outs = _io()
    k = helper.make_tensor("k", TensorProto.INT64, [2], [0, 1])
    b = helper.make_tensor("b", TensorProto.INT64, [2], [1, 0])
    nodes = [
        helper.make_node("Shape", ["x"], ["s"]),
        helper.make_node("Mul", ["s", "k"], ["t"]),
        helper.make_node("Add", ["t", "b"], ["target"]),
        helper.make_node("Reshape", ["x", "target"], ["y"]),
    ]
    _save(helper.make_graph(nodes, "b", ins, outs, [k, b]), path)


def _load_at_concurrency(server: ServerProcess, concurrency: int, requests: int) -> Counter[str]:
    """`requests` unversioned requests of 2 rows from `concurrency` clients;
    counts answers by version, or by status when they failed."""
    x = np.ones((2, 4), np.float32)
    counts: Counter[str] = Counter()
    lock = threading.Lock()

    def client_loop(n: int) -> None:
        client = tc.InferenceServerClient(server.url)
        for _ in range(n):
            try:
                result = infer(client, x)[0]
            except InferenceServerException as exc:
                result = exc.status() or "?"
            with lock:
                counts[result] += 1

    per_client = requests // concurrency
    threads = [threading.Thread(target=client_loop, args=(per_client,)) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return counts


@pytest.mark.slow
def test_healthy_canary_under_load_stays_and_a_failing_one_still_rolls_back(
    tmp_path: Path, start_server: Callable[..., ServerProcess]
) -> None:
    # Under load most background comparisons are skipped (at most 64 in
    # flight); the error guard must still see the canary's successes. The
    # latency guard is tuned out through the model's parameter: with 64 client
    # threads on two cores, one preempted executor moves an arm's median by
    # tens of milliseconds, which says nothing about the canary.
    labels = {"stable": 1, "canary": {"version": 2, "weight": 0.5}}
    config = CONFIG + (
        'parameters { key: "canary_min_latency_excess_ms" value { string_value: "10000" } }\n'
    )
    healthy = start_server(make_repo(tmp_path / "healthy", healthy_rewrite, labels, config))
    counts = _load_at_concurrency(healthy, 64, 3200)
    assert set(counts) == {"1", "2"}, counts
    rollbacks = [line for line in healthy.log.splitlines() if "rolling canary" in line]
    assert metric(healthy, "sluice_canary_rollbacks_total") == 0, rollbacks
    written = json.loads((tmp_path / "healthy" / MODEL / "labels.json").read_text())
    assert written["canary"]["version"] == 2

    failing = start_server(make_repo(tmp_path / "failing", broken_at_runtime, labels, config))
    counts = _load_at_concurrency(failing, 64, 1280)
    assert metric(failing, "sluice_canary_rollbacks_total", version="2", guard="error") == 1
    assert counts["StatusCode.INTERNAL"] > 0
    assert {infer(tc.InferenceServerClient(failing.url), np.ones((2, 4), np.float32))[0]} == {"1"}
