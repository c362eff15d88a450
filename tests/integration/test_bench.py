"""`sluice bench` end to end: the load generator runs as a subprocess (as users run
it) against a real server, and what it reports is checked against the server's own
ModelStatistics, read with tritonclient. This module never imports sluice: its
generated protos and tritonclient's share a protobuf package."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import tritonclient.grpc as grpcclient
from conftest import ServerProcess, wait_until

MODEL = "tabular_classifier"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None


def bench(*args: str, timeout_s: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sluice.cli", "bench", *args],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )


def server_successes(url: str) -> int:
    client = grpcclient.InferenceServerClient(url)
    try:
        stats = client.get_inference_statistics(MODEL)
    finally:
        client.close()
    return sum(s.inference_stats.success.count for s in stats.model_stats)


def run_json(server: ServerProcess, *args: str) -> dict[str, Any]:
    done = bench(
        MODEL,
        "--url",
        server.url,
        "--metrics-url",
        f"http://127.0.0.1:{server.http_port}/metrics",
        "--json",
        *args,
    )
    assert done.returncode == 0, done.stderr
    report: dict[str, Any] = json.loads(done.stdout)
    return report


def test_bench_reports_what_the_server_counted(
    start_server: Callable[..., ServerProcess],
) -> None:
    server = start_server(None, "--cost-per-hour", "3.6")
    before = server_successes(server.url)

    report = run_json(server, "--requests", "300", "--concurrency", "8")

    assert report["requests"] == report["successes"] == 300
    assert report["errors"] == {"total": 0, "by_code": {}, "examples": {}}
    assert report["throughput"]["requests_per_s"] > 0
    assert report["throughput"]["rows_per_s"] == pytest.approx(
        report["throughput"]["requests_per_s"]
    )
    latency = report["latency_ms"]
    assert 0 < latency["p50"] <= latency["p90"] <= latency["p99"] <= latency["max"]
    warmup = report["warmup"]["successes"]
    assert warmup == report["warmup"]["requests"] == 20
    assert server_successes(server.url) - before == 300 + warmup

    srv = report["server"]
    assert srv["requests"] == 300  # the measured run only: the snapshot follows the warmup
    assert srv["avg_batch_size"] >= 1
    assert set(srv["avg_us"]) == {"queue", "compute_input", "compute_infer", "compute_output"}
    assert all(v >= 0 for v in srv["avg_us"].values())
    assert srv["avg_us"]["compute_infer"] > 0

    cost = report["cost"]
    assert cost["usd_per_1000_inferences"] > 0, cost
    assert cost["inferences"] == 300
    assert cost["note"] is None
    assert report["missing"] == []


def test_bench_table_says_cost_is_zero_without_a_price(
    start_server: Callable[..., ServerProcess],
) -> None:
    server = start_server()
    done = bench(
        MODEL,
        "--url",
        server.url,
        "--metrics-url",
        f"http://127.0.0.1:{server.http_port}/metrics",
        "--requests",
        "50",
    )
    assert done.returncode == 0, done.stderr
    assert "requests      50 in" in done.stdout
    assert "errors        0" in done.stdout
    assert "average batch size" in done.stdout
    assert "$0 per 1000 inferences" in done.stdout
    assert "--cost-per-hour" in done.stdout
    assert done.stderr.count("\r") == 0  # no progress bar: stderr is not a terminal


@pytest.mark.skipif(not HAS_MATPLOTLIB, reason="matplotlib (the plot extra) is not installed")
def test_bench_plot_writes_a_png(example_server: ServerProcess, tmp_path: Path) -> None:
    out = tmp_path / "out.png"
    done = bench(
        MODEL, "--url", example_server.url, "--requests", "200", "--json", "--plot", str(out)
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["successes"] == 200
    assert out.read_bytes()[:8] == PNG_MAGIC
    assert out.stat().st_size > 10_000  # two drawn panels, not an empty canvas


def test_bench_plot_without_matplotlib_says_how_to_install_it(tmp_path: Path) -> None:
    # None in sys.modules makes `import matplotlib` fail as if it were not installed.
    code = (
        "import sys; sys.modules['matplotlib'] = None; from sluice.cli import main; "
        f"sys.exit(main(['bench', 'm', '--url', '127.0.0.1:1', '--plot', {str(tmp_path)!r}]))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode != 0
    assert 'pip install "sluice-serve[plot]"' in done.stderr


def test_bench_unknown_model_fails_clearly(example_server: ServerProcess) -> None:
    done = bench("no_such_model", "--url", example_server.url, "--requests", "10")
    assert done.returncode != 0
    assert "no_such_model" in done.stderr
    assert "NOT_FOUND" in done.stderr
    assert "Traceback" not in done.stderr
    assert done.stdout == ""


def test_bench_keeps_what_it_measured_when_the_server_stops(
    start_server: Callable[..., ServerProcess],
) -> None:
    server = start_server()
    proc = subprocess.Popen(
        [sys.executable, "-m", "sluice.cli", "bench", MODEL, "--url", server.url,
         "--metrics-url", f"http://127.0.0.1:{server.http_port}/metrics",
         "--duration", "8", "--json", "--no-progress"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        # Wait on the server's own count: the measured run is under way once it
        # passes the 20 warmup requests.
        def measuring() -> bool:
            assert proc.poll() is None, proc.communicate()
            return server_successes(server.url) >= 20 + 100

        wait_until("the measured run to get going", measuring, timeout_s=60, interval_s=0.05)
        server.stop()
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    report = json.loads(out)
    assert report["successes"] >= 100
    assert report["errors"]["by_code"].get("UNAVAILABLE", 0) > 0
    assert report["latency_ms"]["p50"] > 0
    assert report["server"]["requests"] is None
    assert "statistics after the run unavailable" in report["server"]["note"]
    assert [m.split(":")[0] for m in report["missing"]] == ["server", "cost"]


def test_bench_leaves_out_cost_read_from_another_server(
    start_server: Callable[..., ServerProcess],
) -> None:
    measured = start_server(None, "--cost-per-hour", "3.6")
    other = start_server(None, "--cost-per-hour", "3.6")
    done = bench(
        MODEL,
        "--url",
        measured.url,
        "--metrics-url",
        f"http://127.0.0.1:{other.http_port}/metrics",
        "--requests",
        "50",
    )
    assert done.returncode == 0, done.stderr
    assert "not the same server's page" in done.stdout
    assert "missing from this report" in done.stdout
    assert "per 1000 inferences" not in done.stdout
