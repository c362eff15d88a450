"""`sluice serve --frontends N`: N gRPC frontend processes on one port feeding
one model host. To clients (tritonclient, grpc health) they are one server:
one set of answers, statistics and metrics; a control call on any frontend
holds for all; a frontend that dies is restarted while the others serve."""

from __future__ import annotations

import signal
import threading
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import psutil
import pytest
import tritonclient.grpc as tc
from conftest import ServerProcess, wait_until
from grpc_health.v1 import health_pb2, health_pb2_grpc
from onnx_models import build_scaler
from prometheus_client.parser import text_string_to_metric_families
from test_prometheus import dashboard_exprs, parse_promql, scrape
from tritonclient.utils import InferenceServerException

CONFIG = """max_batch_size: 8
input [ { name: "x" data_type: TYPE_FP32 dims: [ 4 ] } ]
output [ { name: "y" data_type: TYPE_FP32 dims: [ 4 ] } ]
dynamic_batching { max_queue_delay_microseconds: 500 }
"""


@pytest.fixture
def start_server() -> Iterator[Callable[..., ServerProcess]]:
    """Frontends forward bytes whatever runs the batches: these tests use one
    executor (the suite's executor-parametrised tests cover both)."""
    started: list[ServerProcess] = []

    def start(repository: Path, *extra_args: str) -> ServerProcess:
        server = ServerProcess(repository, list(extra_args), executor="thread")
        started.append(server)
        return server

    yield start
    for s in started:
        s.stop()


def _repo(root: Path, names: tuple[str, ...] = ("scale",)) -> Path:
    for name in names:
        build_scaler(root / name / "1" / "model.onnx", 2.0)
        (root / name / "config.pbtxt").write_text(CONFIG)
    return root


def _metrics(server: ServerProcess) -> dict[str, float]:
    """Every sample of a scrape, keyed by name{labels} (labels sorted)."""
    url = f"http://127.0.0.1:{server.http_port}/metrics"
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}"] = s.value
    return out


def _frontends(server: ServerProcess) -> list[psutil.Process]:
    found = []
    for p in psutil.Process(server.proc.pid).children():
        try:
            if "sluice.server.frontend" in p.cmdline():
                found.append(p)
        except psutil.Error:  # exited and not reaped yet
            continue
    return found


# gRPC shares one connection among channels to the same target unless told
# otherwise; a connection lives on one frontend, so clients that want to be
# spread take their own (as perf_analyzer does: a channel per few workers).
OWN_CONNECTION = [("grpc.use_local_subchannel_pool", 1)]


def _client(server: ServerProcess) -> tc.InferenceServerClient:
    return tc.InferenceServerClient(server.url, channel_args=OWN_CONNECTION)


def _infer(client: tc.InferenceServerClient, x: np.ndarray, model: str = "scale") -> np.ndarray:
    inp = tc.InferInput("x", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    y = client.infer(model, [inp], client_timeout=30).as_numpy("y")
    assert y is not None
    return y


def test_two_frontends_answer_as_one_server(
    tmp_path: Path, start_server: Callable[..., ServerProcess]
) -> None:
    repo = _repo(tmp_path)
    server = start_server(repo, "--frontends", "2")
    assert len(_frontends(server)) == 2
    session = ort.InferenceSession(str(repo / "scale" / "1" / "model.onnx"))
    per_client, clients = 40, 32
    mismatches: list[str] = []
    errors: list[BaseException] = []
    rows = [0] * clients

    def run(seed: int) -> None:
        rng = np.random.default_rng(seed)
        client = _client(server)  # its own connection
        try:
            for _ in range(per_client):
                x = rng.standard_normal((1 + int(rng.integers(3)), 4)).astype(np.float32)
                rows[seed] += len(x)
                want = session.run(None, {"x": x})[0]
                got = _infer(client, x)
                if not np.array_equal(got, want):
                    mismatches.append(f"{got} != {want}")
        except BaseException as exc:  # reported by the test thread
            errors.append(exc)
        finally:
            client.close()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert not mismatches
    sent = per_client * clients
    m = _metrics(server)
    assert m["nv_inference_request_success{model=scale,version=1}"] == sent
    assert m["nv_inference_count{model=scale,version=1}"] == sum(rows)  # rows, as Triton's
    # Both frontends took calls (32 connections all hashed to one: p = 2^-31).
    forwarded = [m.get(f"sluice_frontend_calls_total{{frontend={i}}}", 0) for i in range(2)]
    assert all(f > 0 for f in forwarded), forwarded
    assert m["sluice_frontends{}"] == 2
    # One ModelStatistics answer, whichever frontend is asked.
    for _ in range(4):
        client = _client(server)
        stats = client.get_inference_statistics("scale", as_json=True)
        client.close()
        assert int(stats["model_stats"][0]["inference_stats"]["success"]["count"]) == sent
    # The dashboard's frontend panels query what this server exposes.
    exposed = scrape(server.http_port)
    queried = set()
    for expr in dashboard_exprs():
        for name, labels in parse_promql(expr)[0].items():
            if name.startswith("sluice_frontend"):
                queried.add(name)
                assert name in exposed, name
                assert labels <= exposed[name], (name, labels)
    assert queried == {
        "sluice_frontends",
        "sluice_frontend_calls_total",
        "sluice_frontend_restarts_total",
    }
    # gRPC health through a frontend reflects the host.
    with grpc.insecure_channel(server.url) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="scale"), timeout=5
        )
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    assert server.stop() == 0
    assert "Traceback" not in server.log


def test_unload_through_one_frontend_holds_for_all(
    tmp_path: Path, start_server: Callable[..., ServerProcess]
) -> None:
    repo = _repo(tmp_path)
    server = start_server(
        repo, "--frontends", "2", "--model-control-mode", "explicit", "--load-model", "scale"
    )
    x = np.ones((1, 4), np.float32)
    client = _client(server)
    assert _infer(client, x).tolist() == [[2.0] * 4]
    client.unload_model("scale")
    client.close()
    # Fresh connections land on either frontend: every one sees the unload.
    for _ in range(16):
        other = _client(server)
        with pytest.raises(InferenceServerException) as caught:
            _infer(other, x)
        other.close()
        assert caught.value.status() in ("StatusCode.NOT_FOUND", "StatusCode.UNAVAILABLE")
        assert "scale" in caught.value.message()
    client = _client(server)
    client.load_model("scale")
    assert _infer(client, x).tolist() == [[2.0] * 4]
    client.close()


def test_killed_frontend_restarts_while_the_other_serves(
    tmp_path: Path, start_server: Callable[..., ServerProcess]
) -> None:
    server = start_server(_repo(tmp_path), "--frontends", "2")
    victim = _frontends(server)[0]
    x = np.ones((1, 4), np.float32)
    stop = threading.Event()
    killed = threading.Event()
    lock = threading.Lock()
    # per client: failures (status names), successes after the kill
    failures: dict[int, list[str]] = {i: [] for i in range(8)}
    after_kill: dict[int, int] = dict.fromkeys(range(8), 0)
    before_kill = [0]

    def run(i: int) -> None:
        client = _client(server)
        while not stop.is_set():
            try:
                _infer(client, x)
                with lock:
                    if killed.is_set():
                        after_kill[i] += 1
                    else:
                        before_kill[0] += 1
            except InferenceServerException as exc:
                with lock:
                    failures[i].append(str(exc.status()))
        client.close()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    try:
        wait_until("load before the kill", lambda: before_kill[0] >= 200)
        victim.send_signal(signal.SIGKILL)
        killed.set()
        wait_until(
            "the frontend to be restarted",
            lambda: (
                _metrics(server).get("sluice_frontend_restarts_total{}") == 1
                and len(_frontends(server)) == 2
            ),
        )
        # Every client is served again, those of the dead frontend after reconnecting.
        wait_until(
            "every client to be served after the kill", lambda: min(after_kill.values()) >= 20
        )
    finally:
        stop.set()
        for t in threads:
            t.join()
    statuses = {s for f in failures.values() for s in f}
    assert statuses <= {"StatusCode.UNAVAILABLE", "StatusCode.CANCELLED"}, failures
    # Clients on the surviving frontend never noticed.
    assert any(not f for f in failures.values()), failures
    assert victim.pid not in [p.pid for p in _frontends(server)]
    assert server.stop() == 0


def test_second_server_on_a_port_held_by_frontends_fails(
    tmp_path: Path, start_server: Callable[..., ServerProcess]
) -> None:
    server = start_server(_repo(tmp_path), "--frontends", "2")
    with pytest.raises(RuntimeError, match=f"gRPC port 127.0.0.1:{server.grpc_port} is in use"):
        ServerProcess(_repo(tmp_path / "other"), ["--grpc-port", str(server.grpc_port)])
