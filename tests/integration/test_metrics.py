"""/metrics after known traffic: exact counts, histogram sums that agree with
the ModelStatistics RPC, and the cost attribution formula."""

from __future__ import annotations

import urllib.error
import urllib.request
from collections.abc import Callable

import numpy as np
import pytest
import tritonclient.grpc as tc
from conftest import ServerProcess
from prometheus_client.parser import text_string_to_metric_families
from tritonclient.utils import InferenceServerException

MODEL = "tabular_classifier"
GOOD, BAD = 37, 5

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def _scrape(server: ServerProcess) -> Samples:
    body = urllib.request.urlopen(f"http://127.0.0.1:{server.http_port}/metrics", timeout=5)
    out: Samples = {}
    for family in text_string_to_metric_families(body.read().decode()):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def _get(samples: Samples, name: str, **labels: str) -> float:
    want = {"model": MODEL, "version": "1", **labels}
    matches = [
        v for (n, ls), v in samples.items() if n == name and want.items() <= dict(ls).items()
    ]
    assert len(matches) == 1, f"{name}{labels}: {len(matches)} samples"
    return matches[0]


@pytest.fixture
def traffic(start_server: Callable[..., ServerProcess]) -> tuple[ServerProcess, Samples, dict]:
    server = start_server(None, "--cost-per-hour", "3.6")
    client = tc.InferenceServerClient(server.url)
    rows = 0
    for i in range(GOOD):
        n = 1 + i % 3
        x = tc.InferInput("features", [n, 8], "FP32")
        x.set_data_from_numpy(np.full((n, 8), i, np.float32))
        client.infer(MODEL, [x])
        rows += n
    for _ in range(BAD):
        x = tc.InferInput("features", [1, 7], "FP32")
        x.set_data_from_numpy(np.zeros((1, 7), np.float32))
        with pytest.raises(InferenceServerException):
            client.infer(MODEL, [x])
    stats = client.get_inference_statistics(MODEL, as_json=True)["model_stats"][0]
    stats["rows_sent"] = rows
    return server, _scrape(server), stats


def test_counts_are_exact(traffic: tuple[ServerProcess, Samples, dict]) -> None:
    _, m, stats = traffic
    assert _get(m, "nv_inference_request_success") == GOOD
    assert _get(m, "nv_inference_request_failure", reason="OTHER") == BAD
    assert _get(m, "nv_inference_request_failure", reason="BACKEND") == 0
    assert _get(m, "sluice_rejected_requests_total", reason="invalid_argument") == BAD
    assert _get(m, "nv_inference_count") == stats["rows_sent"]
    assert _get(m, "sluice_request_duration_seconds_count", phase="request") == GOOD
    assert _get(m, "sluice_batch_size_sum") == stats["rows_sent"]
    execs = _get(m, "nv_inference_exec_count")
    assert 1 <= execs <= GOOD
    assert _get(m, "sluice_batch_size_count") == execs
    assert _get(m, "nv_inference_pending_request_count") == 0
    assert _get(m, "sluice_inflight_requests") == 0
    assert _get(m, "sluice_model_state", state="READY") == 1
    assert _get(m, "nv_model_load_duration_secs") > 0


def test_metrics_agree_with_model_statistics(traffic: tuple[ServerProcess, Samples, dict]) -> None:
    _, m, stats = traffic
    inf = stats["inference_stats"]
    assert int(inf["success"]["count"]) == GOOD
    assert int(inf["fail"]["count"]) == BAD
    assert int(stats["inference_count"]) == _get(m, "nv_inference_count")
    assert int(stats["execution_count"]) == _get(m, "nv_inference_exec_count")
    for phase in ("queue", "compute_input", "compute_infer", "compute_output"):
        ns = int(inf[phase]["ns"])
        assert _get(m, f"nv_inference_{phase}_duration_us") == ns // 1000
        assert _get(m, "sluice_request_duration_seconds_sum", phase=phase) == pytest.approx(
            ns / 1e9, rel=1e-9, abs=1e-12
        )
    request_ns = int(inf["success"]["ns"])
    assert _get(m, "nv_inference_request_duration_us") == request_ns // 1000
    assert _get(m, "sluice_request_duration_seconds_sum", phase="request") == pytest.approx(
        request_ns / 1e9, rel=1e-9
    )
    # Every request lands in exactly one latency bucket: +Inf holds them all.
    assert _get(m, "sluice_request_duration_seconds_bucket", phase="request", le="+Inf") == GOOD


def test_phases_fit_inside_each_request(traffic: tuple[ServerProcess, Samples, dict]) -> None:
    # Triton's reading: queue + compute phases never exceed the request's time;
    # the rest (decode, the hop back to the event loop, encode) is overhead.
    _, _, stats = traffic
    inf = stats["inference_stats"]
    phases = ("queue", "compute_input", "compute_infer", "compute_output")
    assert all(int(inf[p]["count"]) == GOOD for p in phases)
    assert sum(int(inf[p]["ns"]) for p in phases) <= int(inf["success"]["ns"])


def test_cost_follows_the_documented_model(traffic: tuple[ServerProcess, Samples, dict]) -> None:
    _, m, stats = traffic
    # One instance gets every core as intra-op threads, so CPU share = compute time:
    # usd = sum(batch compute_infer seconds) * 3.6 USD/h / 3600 s/h.
    infer_ns = sum(int(b["compute_infer"]["ns"]) for b in stats["batch_stats"])
    expected = infer_ns * 1e-9 * 3.6 / 3600
    assert _get(m, "sluice_inference_cost_usd_total") == pytest.approx(expected, rel=1e-9)
    per_1k = _get(m, "sluice_cost_per_1000_inferences_usd")
    assert per_1k == pytest.approx(1000 * expected / stats["rows_sent"], rel=1e-9)


def test_host_gauges_and_health_endpoints(example_server: ServerProcess) -> None:
    m = _scrape(example_server)
    assert m[("nv_cpu_memory_total_bytes", frozenset())] > 0
    assert 0 <= m[("nv_cpu_utilization", frozenset())] <= 1
    assert any(n == "sluice_build_info" for n, _ in m)
    base = f"http://127.0.0.1:{example_server.http_port}"
    for path in ("/v2/health/live", "/v2/health/ready"):
        assert urllib.request.urlopen(base + path, timeout=5).status == 200


def test_allow_metrics_false_serves_no_metrics_but_keeps_statistics(
    start_server: Callable[..., ServerProcess],
) -> None:
    server = start_server(None, "--allow-metrics", "false")
    base = f"http://127.0.0.1:{server.http_port}"
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(base + "/metrics", timeout=5)
    assert info.value.code == 404
    info.value.close()
    assert urllib.request.urlopen(base + "/v2/health/ready", timeout=5).status == 200
    banner = "".join(server.stdout_lines)
    assert "(/v2/health/ready)" in banner  # the banner does not offer the missing /metrics
    assert "/metrics" not in banner
    client = tc.InferenceServerClient(server.url)
    x = tc.InferInput("features", [1, 8], "FP32")
    x.set_data_from_numpy(np.zeros((1, 8), np.float32))
    client.infer(MODEL, [x])
    stats = client.get_inference_statistics(MODEL, as_json=True)["model_stats"][0]
    assert int(stats["inference_stats"]["success"]["count"]) == 1
