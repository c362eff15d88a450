"""Drift monitoring on a real server: profiles from `sluice profile`, live
windows fed by traffic, /metrics, the DriftReport and Feedback RPCs, schema
skew, and a model without a profile. Plus the profile command's data formats."""

from __future__ import annotations

import json
import re
import shutil
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tc
from conftest import ServerProcess, wait_until
from prometheus_client.parser import text_string_to_metric_families
from sluice import cli, defaults
from sluice.cli.drift import report_dict
from sluice.monitoring import drift
from sluice.proto import sluice_service_pb2 as spb
from sluice.proto import sluice_service_pb2_grpc as spb_grpc
from tritonclient.utils import InferenceServerException

EXAMPLE = defaults.EXAMPLES / "tabular_classifier"
REPO_ROOT = Path(__file__).resolve().parents[2]
FEATURES = 8
SHIFTED = (0, 3, 5)
# One copy of the example per scenario, so each window holds one kind of traffic.
SAME, SHIFT, SKEW, PLAIN = "drift_same", "drift_shift", "drift_skew", "plain"
WINDOW = 'parameters [ { key: "drift_window_seconds" value { string_value: "3600" } },\n' + (
    '{ key: "drift_panes" value { string_value: "1" } } ]\n'
)
ROWS_PER_REQUEST, REQUESTS = 50, 30  # 1500 rows: well above the 100-row minimum


def _reference(rows: int = 4000, seed: int = 7) -> np.ndarray[Any, Any]:
    return np.random.default_rng(seed).standard_normal((rows, FEATURES)).astype(np.float32)


def _copy_model(repo: Path, name: str) -> Path:
    target = repo / name
    shutil.copytree(EXAMPLE, target)
    config = target / "config.pbtxt"
    text = config.read_text().replace('name: "tabular_classifier"', f'name: "{name}"')
    config.write_text(text + WINDOW)
    return target


@pytest.fixture(scope="module")
def profiled_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = tmp_path_factory.mktemp("drift-repo")
    data = tmp_path_factory.mktemp("drift-data") / "reference.npy"
    np.save(data, _reference())
    for name in (SAME, SHIFT, SKEW, PLAIN):
        _copy_model(repo, name)
    for name in (SAME, SHIFT, SKEW):
        rc = cli.main(["profile", name, "1", "--data", str(data), "--model-repository", str(repo)])
        assert rc == 0
        (repo / name / "1" / "metadata.json").write_text(json.dumps({"metrics": {"accuracy": 0.9}}))
    return repo


@pytest.fixture(scope="module")
def server(profiled_repo: Path, executor: str) -> Iterator[ServerProcess]:
    s = ServerProcess(profiled_repo, [], executor=executor)
    yield s
    s.stop()


def _send(
    client: tc.InferenceServerClient, model: str, x: np.ndarray[Any, Any], rid: str = ""
) -> Any:
    inp = tc.InferInput("features", list(x.shape), "FP32")
    inp.set_data_from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    return client.infer(model, [inp], request_id=rid)


def _traffic(url: str, model: str, transform: Callable[[np.ndarray[Any, Any]], Any]) -> None:
    client = tc.InferenceServerClient(url)
    rng = np.random.default_rng(hash(model) % 1000)
    for _ in range(REQUESTS):
        x = rng.standard_normal((ROWS_PER_REQUEST, FEATURES)).astype(np.float32)
        _send(client, model, transform(x))
    client.close()


def _report(url: str, model: str) -> dict[str, Any]:
    with grpc.insecure_channel(url) as channel:
        reply = spb_grpc.SluiceServiceStub(channel).DriftReport(
            spb.DriftReportRequest(model_name=model), timeout=10
        )
    return report_dict(reply)


def _wait_rows(url: str, model: str, rows: int, timeout_s: float = 30) -> dict[str, Any]:
    """The report once the window holds `rows` rows (the windows are fed right
    after each response leaves, so they may trail the last response briefly)."""

    def attempt() -> dict[str, Any] | None:
        report = _report(url, model)
        return report if report["inputs"]["rows"] >= rows else None

    return wait_until(f"{rows} rows in {model}'s drift window", attempt, timeout_s)


def _scrape(server: ServerProcess) -> list[tuple[str, dict[str, str], float]]:
    body = urllib.request.urlopen(f"http://127.0.0.1:{server.http_port}/metrics", timeout=5)
    return [
        (s.name, s.labels, s.value)
        for family in text_string_to_metric_families(body.read().decode())
        for s in family.samples
    ]


def _drifted(report: dict[str, Any]) -> set[str]:
    return {f["name"] for f in report["inputs"]["features"] if f["verdict"] == "drift"}


def _shift(x: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    y = x.copy()
    y[:, list(SHIFTED)] += 1.0  # +1 reference sigma
    return y


def _unscale(x: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    y = x.copy()
    y[:, 2] *= 100.0  # scaled in training, raw in serving
    return y


@pytest.fixture(scope="module")
def fed(server: ServerProcess) -> ServerProcess:
    _traffic(server.url, SAME, lambda x: x)
    _traffic(server.url, SHIFT, _shift)
    _traffic(server.url, SKEW, _unscale)
    for model in (SAME, SHIFT, SKEW):
        _wait_rows(server.url, model, ROWS_PER_REQUEST * REQUESTS)
    return server


def test_same_distribution_has_no_drift(fed: ServerProcess) -> None:
    report = _report(fed.url, SAME)
    assert report["available"]
    assert report["inputs"]["rows"] >= ROWS_PER_REQUEST * REQUESTS  # + Feedback's requests
    assert report["inputs"]["dataset"] == "no_drift"
    assert _drifted(report) == set()
    assert all(f["skew"] == [] for f in report["inputs"]["features"])
    assert report["outputs"]["dataset"] == "no_drift"


def test_shifted_features_are_flagged(fed: ServerProcess) -> None:
    report = _report(fed.url, SHIFT)
    assert _drifted(report) == {f"features[{i}]" for i in SHIFTED}
    # A 1-sigma shift is drift, not a pipeline skew.
    assert all(f["skew"] == [] for f in report["inputs"]["features"])
    samples = _scrape(fed)
    detected = {
        labels["feature"]: value
        for name, labels, value in samples
        if name == "sluice_drift_detected" and labels["model"] == SHIFT
    }
    assert {f for f, v in detected.items() if v == 1} == {f"features[{i}]" for i in SHIFTED}
    assert "output:probabilities[0]" in detected
    psi = {
        labels["feature"]: value
        for name, labels, value in samples
        if name == "sluice_drift_score"
        and labels["model"] == SHIFT
        and labels["statistic"] == "psi"
    }
    assert psi["features[0]"] > 0.2 > psi["features[1]"]
    rows = [v for n, ls, v in samples if n == "sluice_drift_window_rows" and ls["model"] == SHIFT]
    assert rows == [ROWS_PER_REQUEST * REQUESTS]


def test_drift_command_asks_the_server(
    fed: ServerProcess, capsys: pytest.CaptureFixture[str]
) -> None:
    capsys.readouterr()
    assert cli.main(["drift", SHIFT, "--url", fed.url, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert _drifted(report) == {f"features[{i}]" for i in SHIFTED}
    assert report["window_seconds"] == 3600
    assert cli.main(["drift", PLAIN, "--url", fed.url]) == 0
    assert "drift unavailable" in capsys.readouterr().out


def test_unscaled_feature_is_flagged_as_skew(fed: ServerProcess) -> None:
    report = _report(fed.url, SKEW)
    skew = {f["name"]: f["skew"] for f in report["inputs"]["features"]}
    assert "scale" in skew["features[2]"]
    assert "range" in skew["features[2]"]
    assert all(flags == [] for name, flags in skew.items() if name != "features[2]")
    metric = {
        (labels["feature"], labels["kind"]): value
        for name, labels, value in _scrape(fed)
        if name == "sluice_feature_skew" and labels["model"] == SKEW
    }
    assert metric[("features[2]", "scale")] == 1
    assert metric[("features[1]", "scale")] == 0


def test_schema_skew_counts_wrong_shape(server: ServerProcess) -> None:
    client = tc.InferenceServerClient(server.url)
    with pytest.raises(InferenceServerException):
        _send(client, PLAIN, np.zeros((1, 7), np.float32))
    client.close()
    counted = [
        v
        for n, ls, v in _scrape(server)
        if n == "sluice_schema_skew_total"
        and ls == {"model": PLAIN, "version": "1", "input": "features", "kind": "shape"}
    ]
    assert counted == [1]
    report = _report(server.url, PLAIN)
    assert report["schema_skew"] == [{"input": "features", "kind": "shape", "count": 1}]


def test_model_without_profile_reports_drift_unavailable(server: ServerProcess) -> None:
    report = _report(server.url, PLAIN)
    assert not report["available"]
    assert "no drift profile" in report["reason"]
    assert not any(
        n.startswith("sluice_drift") and ls.get("model") == PLAIN for n, ls, _ in _scrape(server)
    )


def test_feedback_moves_accuracy_and_flags_degradation(server: ServerProcess) -> None:
    client = tc.InferenceServerClient(server.url)
    rng = np.random.default_rng(3)
    predicted: dict[str, int] = {}
    for i in range(90):
        result = _send(client, SAME, rng.standard_normal((1, FEATURES)), rid=f"req-{i}")
        predicted[f"req-{i}"] = int(result.as_numpy("label")[0, 0])
    client.close()

    def feedback(ids: range, correct: bool) -> spb.FeedbackResponse:
        labels = [
            spb.GroundTruth(
                request_id=f"req-{i}",
                values=[predicted[f"req-{i}"] if correct else (predicted[f"req-{i}"] + 1) % 3],
            )
            for i in ids
        ]
        with grpc.insecure_channel(server.url) as channel:
            return spb_grpc.SluiceServiceStub(channel).Feedback(
                spb.FeedbackRequest(model_name=SAME, labels=labels), timeout=10
            )

    good = feedback(range(40), correct=True)
    assert (good.matched, good.unknown) == (40, 0)
    assert good.quality.metrics["accuracy"] == 1.0
    assert not good.quality.degraded
    bad = feedback(range(40, 90), correct=False)
    assert bad.quality.metrics["accuracy"] == pytest.approx(40 / 90)
    assert bad.quality.degraded
    assert bad.quality.baseline["accuracy"] == 0.9
    unknown = feedback(range(0), correct=True)
    assert unknown.matched == 0
    samples = _scrape(server)
    quality = [
        v
        for n, ls, v in samples
        if n == "sluice_model_quality" and ls["model"] == SAME and ls["metric"] == "accuracy"
    ]
    assert quality == [pytest.approx(40 / 90)]
    assert [
        v for n, ls, v in samples if n == "sluice_model_quality_degraded" and ls["model"] == SAME
    ] == [1]
    assert _report(server.url, SAME)["quality"]["degraded"]


def test_feedback_command_sends_labels_and_names_a_wrong_row_count(
    server: ServerProcess, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    client = tc.InferenceServerClient(server.url)
    rng = np.random.default_rng(11)
    predicted: dict[str, list[int]] = {}
    for i in range(5):  # two rows per request: one label per row
        result = _send(client, SKEW, rng.standard_normal((2, FEATURES)), rid=f"cli-{i}")
        predicted[f"cli-{i}"] = [int(v) for v in result.as_numpy("label")[:, 0]]
    client.close()
    labels = tmp_path / "labels.csv"
    lines = [f"{rid},{a},{b}" for rid, (a, b) in predicted.items()]
    labels.write_text("\n".join(["request_id,row0,row1", *lines, "never-sent,1,1"]) + "\n")
    url = ["--url", server.url]
    assert cli.main(["feedback", SKEW, "--labels", str(labels), "--json", *url]) == 0
    result = json.loads(capsys.readouterr().out)
    assert (result["matched"], result["unknown"]) == (5, 1)
    assert result["quality"]["labelled"] == 10  # rows, not requests
    assert result["quality"]["metrics"]["accuracy"] == 1.0

    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps({"cli-0": [1]}))
    assert cli.main(["feedback", SKEW, "--labels", str(wrong), *url]) == 1
    err = capsys.readouterr().err
    assert "INVALID_ARGUMENT" in err
    assert "'cli-0': 1 value(s) for 2 predicted row(s)" in err
    # Nothing was counted for the refused label.
    assert _report(server.url, SKEW)["quality"]["labelled"] == 10


def test_rules_and_dashboard_drift_metrics_exist(fed: ServerProcess) -> None:
    """The drift families appear only for profiled versions, so the generic
    exposition check (test_prometheus.py) exempts them; this checks them here."""
    text = (REPO_ROOT / "docker" / "prometheus" / "alerts.yml").read_text()
    text += (REPO_ROOT / "docker" / "grafana" / "sluice-dashboard.json").read_text()
    queried = set(re.findall(r"\b(sluice_(?:drift|feature_skew|model_quality)\w*)", text))
    assert "sluice_drift_detected" in queried
    exposed = {n for n, _, _ in _scrape(fed)}
    assert queried - exposed - {"sluice_model_quality", "sluice_model_quality_degraded"} == set()


def test_new_profile_reloads_the_version(
    tmp_path: Path, start_server: Callable[..., ServerProcess]
) -> None:
    _copy_model(tmp_path, "m")
    server = start_server(tmp_path, "--model-control-mode", "explicit", "--load-model", "m")
    assert not _report(server.url, "m")["available"]
    np.save(tmp_path / "d.npy", _reference(rows=500))
    args = ["profile", "m", "1", "--data", str(tmp_path / "d.npy")]
    assert cli.main([*args, "--model-repository", str(tmp_path)]) == 0
    client = tc.InferenceServerClient(server.url)
    client.load_model("m")  # returns once the reloaded version serves
    _send(client, "m", _reference(rows=5, seed=9))
    client.close()
    assert _wait_rows(server.url, "m", 5)["available"]


# ---------------------------------------------------------------- sluice profile


@pytest.mark.parametrize("suffix", [".npy", ".npz", ".csv"])
def test_profile_command_reads_each_format(tmp_path: Path, suffix: str) -> None:
    _copy_model(tmp_path, "m")
    x = _reference(rows=500, seed=1)
    x[:, 3] = np.arange(500) % 4  # a categorical column
    path = tmp_path / f"data{suffix}"
    if suffix == ".npy":
        np.save(path, x)
    elif suffix == ".npz":
        np.savez(path, features=x)
    else:
        header = ",".join(f"c{i}" for i in range(FEATURES))
        np.savetxt(path, x, delimiter=",", header=header, comments="")
    args = ["profile", "m", "1", "--data", str(path), "--model-repository", str(tmp_path)]
    assert cli.main([*args, "--categorical", "f3"]) == 0
    tensors = drift.load(tmp_path / "m" / "1")
    assert tensors is not None
    inputs = [t for t in tensors if not t.output]
    assert [t.name for t in inputs] == ["features"]
    assert inputs[0].kinds[3] == "categorical"
    assert inputs[0].kinds[0] == "numeric"
    profile = inputs[0].profile
    assert profile is not None
    assert profile.numeric(0).n == 500
    assert list(profile.categorical(3).codes) == [0, 1, 2, 3]
    outputs = {t.name: t for t in tensors if t.output}
    assert set(outputs) == {"probabilities", "label"}
    assert outputs["label"].kinds == ["categorical"]
    assert (tmp_path / "m" / "1" / "drift_profile.bin").is_file()
    assert (tmp_path / "m" / "1" / "drift_profile_outputs.bin").is_file()


def test_offline_drift_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _copy_model(tmp_path, "m")
    ref, live = tmp_path / "ref.npy", tmp_path / "live.npy"
    np.save(ref, _reference(rows=3000, seed=2))
    np.save(live, _shift(_reference(rows=1000, seed=3)))
    repo = ["--model-repository", str(tmp_path)]
    assert cli.main(["profile", "m", "1", "--data", str(ref), *repo]) == 0
    capsys.readouterr()
    assert cli.main(["drift", "m", "--data", str(live), "--json", *repo]) == 0
    report = json.loads(capsys.readouterr().out)
    assert _drifted(report) == {f"features[{i}]" for i in SHIFTED}
    assert cli.main(["drift", "m", "--data", str(live), *repo]) == 0
    assert "features[0]" in capsys.readouterr().out


def test_profile_command_rejects_unknown_categorical(tmp_path: Path) -> None:
    _copy_model(tmp_path, "m")
    np.save(tmp_path / "d.npy", _reference(rows=100))
    args = ["profile", "m", "1", "--data", str(tmp_path / "d.npy")]
    assert cli.main([*args, "--model-repository", str(tmp_path), "--categorical", "f9"]) == 1


def test_offline_drift_plot(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    _copy_model(tmp_path, "m")
    ref, live = tmp_path / "ref.npy", tmp_path / "live.npy"
    np.save(ref, _reference(rows=2000, seed=4))
    np.save(live, _shift(_reference(rows=500, seed=5)))
    repo = ["--model-repository", str(tmp_path)]
    assert cli.main(["profile", "m", "1", "--data", str(ref), *repo]) == 0
    png = tmp_path / "drift.png"
    assert cli.main(["drift", "m", "--data", str(live), "--plot", str(png), *repo]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
