"""The status page on a real server, looked at in headless Chromium: a degraded
model with its reason, a canary with its weight, and the last minute's traffic.

Chromium is Debian's `chromium` package (.ci/run installs it); without it the
browser test skips, saying so. The screenshot is kept under
$SLUICE_TEST_ARTIFACTS (else the test's tmp path) and its path is printed.
"""

from __future__ import annotations

import html.parser
import importlib.resources
import json
import os
import re
import shutil
import subprocess
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx_models
import pytest
import tritonclient.grpc as tc
from conftest import ServerProcess, wait_until
from sluice import cli
from test_drift import REQUESTS, ROWS_PER_REQUEST, _copy_model, _reference, _shift, _wait_rows
from test_drift import _traffic as _drift_traffic
from test_errors import BROKEN_CONFIG, BROKEN_REASON
from test_rollout import MODEL, healthy_rewrite, make_repo, metric, scaler
from tritonclient.utils import InferenceServerException

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CANARY_LABELS = {"stable": 1, "canary": {"version": 2, "weight": 0.3}}


class _VisibleText(html.parser.HTMLParser):
    """The text a browser shows: everything outside head, style and script."""

    HIDDEN = ("head", "style", "script", "title")

    def __init__(self) -> None:
        super().__init__()
        self.parts: list[str] = []
        self._hidden = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self._hidden += tag in self.HIDDEN

    def handle_endtag(self, tag: str) -> None:
        self._hidden -= tag in self.HIDDEN

    def handle_data(self, data: str) -> None:
        if self._hidden == 0:
            self.parts.append(data)

    @classmethod
    def of(cls, page: str) -> str:
        parser = cls()
        parser.feed(page)
        return re.sub(r"\s+", " ", " ".join(parser.parts))


def _get(server: ServerProcess, path: str, headers: dict[str, str] | None = None) -> str:
    request = urllib.request.Request(
        f"http://127.0.0.1:{server.http_port}{path}", headers=headers or {}
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return str(response.read().decode())


DRIFTING = "drifting"


def _repository(root: Path, profiled: bool = False) -> Path:
    make_repo(root, healthy_rewrite, CANARY_LABELS)
    onnx_models.build_add_sub(root / "broken" / "1" / "model.onnx")
    (root / "broken" / "config.pbtxt").write_text(BROKEN_CONFIG)
    if profiled:  # the bundled classifier with a drift profile and an accuracy baseline
        _copy_model(root, DRIFTING)
        data = root.parent / "reference.npy"
        np.save(data, _reference())
        argv = ["profile", DRIFTING, "1", "--data", str(data), "--model-repository", str(root)]
        assert cli.main(argv) == 0
        (root / DRIFTING / "1" / "metadata.json").write_text(
            json.dumps({"metrics": {"accuracy": 0.9}})
        )
    return root


def _drift_and_wrong_feedback(server: ServerProcess) -> None:
    """Shifted features into the drifting model's window, then 40 requests whose
    Feedback says every prediction was wrong."""
    _drift_traffic(server.url, DRIFTING, _shift)
    _wait_rows(server.url, DRIFTING, ROWS_PER_REQUEST * REQUESTS)
    client = tc.InferenceServerClient(server.url)
    x = np.zeros((1, 8), np.float32)
    labels = []
    for i in range(40):
        inp = tc.InferInput("features", [1, 8], "FP32")
        inp.set_data_from_numpy(x)
        predicted = int(client.infer(DRIFTING, [inp], request_id=f"r{i}").as_numpy("label")[0, 0])
        labels.append({"request_id": f"r{i}", "values": [(predicted + 1) % 3]})
    client.close()
    request = urllib.request.Request(
        f"http://127.0.0.1:{server.http_port}/v2/models/{DRIFTING}/feedback",
        data=json.dumps({"labels": labels}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        assert json.loads(response.read())["matched"] == 40


def _traffic(server: ServerProcess, ok: int, bad: int) -> None:
    client = tc.InferenceServerClient(server.url)
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    for _ in range(ok):
        inp = tc.InferInput("x", [2, 4], "FP32")
        inp.set_data_from_numpy(x)
        client.infer(MODEL, [inp])
    for _ in range(bad):  # a wrong datatype: refused, counted as an error of the version
        inp = tc.InferInput("x", [2, 4], "FP64")
        inp.set_data_from_numpy(x.astype(np.float64))
        with pytest.raises(InferenceServerException):
            client.infer(MODEL, [inp], model_version="1")
    client.close()


def _artifacts(tmp_path: Path) -> Path:
    where = os.environ.get("SLUICE_TEST_ARTIFACTS")
    out = Path(where) if where else tmp_path
    out.mkdir(parents=True, exist_ok=True)
    return out


@pytest.mark.skipif(
    CHROMIUM is None,
    reason="chromium is not installed (Debian package `chromium`; .ci/run installs it)",
)
def test_page_in_chromium_shows_a_degraded_model_and_a_canary(
    tmp_path: Path, start_server: Callable[..., ServerProcess], executor: str
) -> None:
    assert CHROMIUM is not None
    server = start_server(_repository(tmp_path / "repo", profiled=True))
    _traffic(server, ok=120, bad=6)
    _drift_and_wrong_feedback(server)
    screenshot = _artifacts(tmp_path) / f"status-page-{executor}.png"
    screenshot.unlink(missing_ok=True)
    argv = [
        CHROMIUM,
        "--headless",
        "--disable-gpu",
        "--no-sandbox",
        "--hide-scrollbars",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
        "--window-size=1600,1000",
        f"--screenshot={screenshot}",
        "--dump-dom",
        f"http://127.0.0.1:{server.http_port}/",
    ]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    print(f"status page screenshot: {screenshot}")
    text = _VisibleText.of(done.stdout)
    # Both models, the degraded one with its state and reason.
    assert MODEL in text
    assert "broken" in text
    assert "NOT READY" in text  # strict readiness: 'broken' should load and does not
    assert "UNAVAILABLE" in text
    assert BROKEN_REASON in text
    # The rollout: both labels, the canary's weight, the guard watching it.
    assert "version 2 at weight 0.3" in text
    assert "stable" in text
    assert "canary" in text
    assert "watching:" in text
    # The last minute's traffic: a request rate above zero and the refused requests.
    row = re.search(rf"{MODEL} READY (\d+\.\d) (\d+\.\d)%", text)
    assert row is not None, text[:2000]
    rate_per_s, error_pct = float(row.group(1)), float(row.group(2))
    assert rate_per_s > 0
    assert 0 < error_pct < 50  # 6 refused of 126
    # Drift and quality of the profiled model: shifted features, wrong predictions.
    assert "DRIFT in" in text
    assert "features[0]" in text
    assert "not profiled" in text  # the scaler has no profile
    assert "accuracy 0 over 40 labelled; DEGRADED" in text
    assert "/metrics" in text
    # The screenshot is a real PNG of a rendered page, not an empty canvas.
    data = screenshot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > 20_000, len(data)


def test_page_names_the_guard_decision_after_a_rollback(
    tmp_path: Path, start_server: Callable[..., ServerProcess]
) -> None:
    labels = {"stable": 1, "canary": {"version": 2, "weight": 0.5}}
    server = start_server(make_repo(tmp_path, lambda p: scaler(p, 2.0), labels))
    client = tc.InferenceServerClient(server.url)
    x = np.ones((1, 4), np.float32)

    def rolled_back() -> bool:
        inp = tc.InferInput("x", [1, 4], "FP32")
        inp.set_data_from_numpy(x)
        client.infer(MODEL, [inp])
        return metric(server, "sluice_canary_rollbacks_total", guard="outputs") == 1

    wait_until("the outputs guard to roll the canary back", rolled_back, timeout_s=60)
    client.close()
    text = _VisibleText.of(_get(server, "/status"))
    assert "version 2 auto-rollback" in text
    assert "outputs disagree with stable" in text


def test_page_follows_the_metrics_restriction_and_links_metrics_and_the_dashboard(
    tmp_path: Path, start_server: Callable[..., ServerProcess]
) -> None:
    token = {"scrape-token": "s3cret"}
    server = start_server(
        _repository(tmp_path / "repo"), "--http-restricted-api", "metrics:scrape-token=s3cret"
    )
    for path in ("/", "/status"):
        with pytest.raises(urllib.error.HTTPError) as refused:
            _get(server, path)
        assert refused.value.code == 403
        refused.value.close()
        assert "<h1>sluice" in _get(server, path, token)
    page = _get(server, "/status", token)
    assert 'href="/metrics"' in page
    bundled = importlib.resources.files("sluice").joinpath("grafana", "sluice-dashboard.json")
    if bundled.is_file():
        href = re.search(r'href="(/status/[^"]+\.json)"', page)
        assert href is not None, page
        dashboard = json.loads(_get(server, href.group(1), token))
        assert dashboard["panels"]
    else:  # a source checkout that was never built: the page says where the file is
        assert "docker/grafana/sluice-dashboard.json" in page
