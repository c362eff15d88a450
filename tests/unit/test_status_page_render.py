"""The status page's arithmetic and HTML without a server: the one-minute window
over cumulative counters, latency quantiles from histogram buckets, and escaping
of every value a repository or a client controls."""

from __future__ import annotations

import dataclasses
import html.parser
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
from sluice import cli, defaults
from sluice import config as cfg
from sluice.monitoring.cost import CostModel
from sluice.monitoring.drift import create_monitor
from sluice.monitoring.stats import LATENCY_BUCKETS_S, InferStats
from sluice.monitoring.window import Counts, Window, quantile_s
from sluice.server.status_page import (
    DriftVerdicts,
    ModelStatus,
    PageData,
    RolloutStatus,
    ServerFacts,
    Traffic,
    VersionStatus,
    render,
)

S = 1_000_000_000


def _record(stats: InferStats, n: int, latency_s: float, batch: int = 1) -> None:
    for _ in range(n):
        ns = int(latency_s * 1e9)
        stats.record_request(
            request_ns=ns, queue_ns=0, compute_input_ns=0, compute_infer_ns=ns, compute_output_ns=0
        )
    for _ in range(n // batch):
        stats.record_execution(
            batch_size=batch, compute_input_ns=0, compute_infer_ns=1000, compute_output_ns=0
        )


def test_quantiles_interpolate_within_the_bucket() -> None:
    buckets = [0] * (len(LATENCY_BUCKETS_S) + 1)
    i = LATENCY_BUCKETS_S.index(0.001)  # the (0.0005, 0.001] bucket
    buckets[i] = 100
    assert quantile_s(buckets, 0.5) == pytest.approx(0.00075)
    assert quantile_s(buckets, 0.99) == pytest.approx(0.0005 + 0.0005 * 0.99)
    buckets[-1] = 2  # above every bound: the tail is only known to be beyond it
    assert quantile_s(buckets, 0.995) == math.inf
    assert quantile_s([0] * len(buckets), 0.5) is None


def test_the_window_is_the_difference_from_a_minute_ago() -> None:
    stats = InferStats()
    window = Window(window_s=60, period_s=5)
    key = ("m", 1)
    _record(stats, 10, 0.002)
    window.add(Window.sample(0, [(key, stats)]))
    _record(stats, 30, 0.002)
    window.add(Window.sample(30 * S, [(key, stats)]))
    _record(stats, 60, 0.02, batch=4)
    stats.record_failure(1000, RuntimeError("x"))
    window.add(Window.sample(60 * S, [(key, stats)]))
    # The base is the newest sample at least 60 s old (t=0), not t=30.
    base = window.base(61 * S)
    assert base is not None
    assert base.t_ns == 0
    d = Window.since(base, key, stats)
    assert (d.success, d.failed) == (90, 1)
    assert (d.executions, d.inferences) == (30 + 15, 90)
    t = Traffic(61.0, d, queued=3, inflight=0, detailed=True)
    assert t.rate_per_s == pytest.approx(91 / 61)
    assert t.error_rate == pytest.approx(1 / 91)
    assert t.avg_batch == pytest.approx(2.0)
    # 30 of 90 at 2 ms, 60 at 20 ms: p50 and p99 land in the 20 ms bucket.
    p50, p99 = t.quantile_s(0.5), t.quantile_s(0.99)
    assert p50 is not None
    assert 0.01 < p50 <= 0.02
    assert p99 is not None
    assert p50 < p99 <= 0.02


def test_a_reloaded_version_counts_from_its_own_start() -> None:
    window = Window(window_s=60, period_s=5)
    key = ("m", 1)
    old = InferStats()
    _record(old, 500, 0.001)
    window.add(Window.sample(0, [(key, old)]))
    new = InferStats()  # the version was reloaded: new, zeroed statistics
    _record(new, 7, 0.001)
    d = Window.since(window.base(70 * S), key, new)
    assert d.success == 7  # not 7 - 500


def test_a_young_server_uses_its_oldest_sample() -> None:
    window = Window(window_s=60, period_s=5)
    assert window.base(10 * S) is None
    window.add(Window.sample(2 * S, []))
    window.add(Window.sample(7 * S, []))
    base = window.base(10 * S)
    assert base is not None
    assert base.t_ns == 2 * S


HOSTILE = "<script>alert('x')</script>\"&"


class _Text(html.parser.HTMLParser):
    """What a browser would show, and every element it would build."""

    def __init__(self) -> None:
        super().__init__()
        self.text: list[str] = []
        self.tags: list[str] = []
        self._skip = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        self._skip += tag in ("style", "title")

    def handle_endtag(self, tag: str) -> None:
        self._skip -= tag in ("style", "title")

    def handle_data(self, data: str) -> None:
        if not self._skip:
            self.text.append(data)


def _page(name: str, reason: str, history: str) -> PageData:
    traffic = Traffic(60.0, Counts(), 0, 0, True)
    version = VersionStatus(1, "UNAVAILABLE", reason, (), traffic, 0, 0, None, reason, "")
    model = ModelStatus(name, False, reason, (version,), RolloutStatus(1, "", "", history))
    facts = ServerFacts("0.1.0", "127.0.0.1", 1, 2, True, CostModel())
    return PageData(facts, 5.0, 60.0, False, (model,), 1, False)


def test_every_value_is_escaped() -> None:
    page = render(_page(HOSTILE, "bad <b>config</b>", f"version 2 auto-rollback: {HOSTILE}"))
    parser = _Text()
    parser.feed(page)
    assert "script" not in parser.tags
    assert "b" not in parser.tags
    text = " ".join(parser.text)
    assert HOSTILE in text  # shown as text, exactly as named
    assert "bad <b>config</b>" in text
    assert "UNAVAILABLE" in text
    assert "NOT READY" in text


def test_long_reasons_are_clipped() -> None:
    page = render(_page("m", "r" * 10_000, ""))
    assert "r" * 399 in page
    assert "r" * 401 not in page


def test_cost_is_shown_per_thousand_inferences_when_priced() -> None:
    traffic = Traffic(60.0, Counts(), 0, 0, True)
    # 3.6e12 core-ns = 1 CPU-hour at $3.6/h on 1 core = $3.6 for 1000 inferences.
    v = VersionStatus(1, "READY", "", ("stable",), traffic, 1000, 3600 * S, None, "", "")
    data = dataclasses.replace(
        _page("m", "", ""),
        models=(ModelStatus("m", True, "", (v,), None),),
        facts=ServerFacts("0.1.0", "h", 1, 2, False, CostModel(usd_per_hour=3.6)),
    )
    page = render(data)
    assert "$3.6" in page
    assert 'href="/metrics"' not in page  # --allow-metrics false: no link to nothing


def test_drift_verdicts_are_reused_until_they_are_due(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    shutil.copytree(defaults.EXAMPLES / "tabular_classifier", repo / "tabular_classifier")
    data = tmp_path / "reference.npy"
    rng = np.random.default_rng(0)
    np.save(data, rng.standard_normal((2000, 8)).astype(np.float32))
    argv = [
        "profile",
        "tabular_classifier",
        "1",
        "--data",
        str(data),
        "--model-repository",
        str(repo),
    ]
    assert cli.main(argv) == 0
    config, _ = cfg.read_config_file(repo / "tabular_classifier")
    monitor = create_monitor(repo / "tabular_classifier" / "1", config, None)
    assert monitor is not None
    traffic = Traffic(60.0, Counts(), 0, 0, True)
    v = VersionStatus(1, "READY", "", (), traffic, 0, 0, monitor, "", "")
    cached, fresh = DriftVerdicts(refresh_s=3600), DriftVerdicts(refresh_s=0)
    assert cached.of("m", v).startswith("too few rows yet (0 in the window)")
    x = rng.standard_normal((1500, 8)).astype(np.float32)
    x[:, 3] += 3.0  # three reference sigmas: drift
    monitor.observe({"features": x}, [])
    # Within its refresh period the verdict is the one already computed...
    assert cached.of("m", v).startswith("too few rows yet")
    # ...and once due it is computed again.
    assert fresh.of("m", v).startswith("DRIFT in 1 of 8 features (features[3])")
    cached.keep_only(set())
    assert cached.of("m", v).startswith("DRIFT in")


def test_ports_name_the_frontend_processes() -> None:
    data = _page("m", "", "")
    assert "frontend processes" not in render(data)
    two = dataclasses.replace(data.facts, grpc_port=8001, frontends=2)
    assert "gRPC 127.0.0.1:8001 (2 frontend processes)" in render(
        dataclasses.replace(data, facts=two)
    )
