"""The monitoring stack in docker/ against the real thing.

(a) promtool checks docker/prometheus/prometheus.yml and alerts.yml and runs the
    rule unit tests in alerts_test.yml (which must give every alert a firing and a
    silent case, and every recording rule an expression test);
(b) a real Prometheus (Debian's 2.42 here) scrapes a running `sluice serve` every
    second while the real alerts.yml is loaded; after known traffic the API returns
    the exact counts, every rule evaluates without error, and every dashboard query
    parses and returns data;
(c) every metric name (and label name) that the dashboard and the rules query is in
    sluice's real /metrics output.

promtool and prometheus come from the Debian package `prometheus` (.ci/run installs
it). Without them the tests skip, unless the CI environment variable is set: then a
missing binary is a failure.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import socket
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import yaml
from conftest import ServerProcess, wait_until
from tritonclient.utils import InferenceServerException

REPO = Path(__file__).resolve().parents[2]
PROMETHEUS_DIR = REPO / "docker" / "prometheus"
DASHBOARD = REPO / "docker" / "grafana" / "sluice-dashboard.json"
MODEL = "tabular_classifier"
REQUESTS = 200  # successful requests sent in (b)
ROWS = 2  # rows per request: nv_inference_count counts rows
# Labels that Prometheus attaches to every scraped series (target labels).
TARGET_LABELS = frozenset({"instance", "job"})
# nv_gpu_* gauges exist only when nvidia-ml-py finds an NVIDIA driver
# (python/sluice/monitoring/metrics.py, _init_nvml); they are exempt where absent.
NVML_ONLY_PREFIX = "nv_gpu_"
# Drift, feature-skew and model-quality families have samples only for versions
# with a drift profile (sluice profile); the bundled examples have none, so they
# are exempt here where absent. tests/integration/test_drift.py checks that every
# one the rules and the dashboard query is exposed for a profiled model.
# Shadow comparisons and canary rollbacks have samples only while a model has a
# shadow label or after a guard fired; tests/integration/test_rollout.py checks
# that the dashboard's rollout queries are exposed then. (Every unversioned
# request counts sluice_rollout_requests_total{arm="stable"}, so that one is here.)
# The sluice_frontend* families exist only with --frontends N > 1;
# tests/integration/test_frontends.py checks the dashboard's queries of them.
ONLY_WHEN_USED = re.compile(
    r"^sluice_(drift_|feature_skew|model_quality|shadow_comparisons|canary_rollbacks|frontend)"
)

T = TypeVar("T")
StartServer = Callable[..., ServerProcess]


def require_binary(name: str) -> str:
    path = shutil.which(name)
    if path is not None:
        return path
    message = f"{name} is not installed (Debian package `prometheus`; .ci/run installs it)"
    if os.environ.get("CI"):
        pytest.fail(f"{message}, and CI is set")
    pytest.skip(message)


# Prometheus answers over HTTP: re-ask every 0.2 s, for up to a minute by default.
poll = functools.partial(wait_until, timeout_s=60, interval_s=0.2)


def series(name: str, **labels: str) -> str:
    """A selector for MODEL's series as the test's Prometheus job scrapes them."""
    matchers = {"job": "sluice", "model": MODEL, **labels}
    return name + "{" + ", ".join(f'{k}="{v}"' for k, v in matchers.items()) + "}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def http_get(url: str, timeout_s: float = 10) -> str:
    with urllib.request.urlopen(url, timeout=timeout_s) as response:
        body: bytes = response.read()
        return body.decode()


# --------------------------------------------------------------------------- traffic


def send_traffic(url: str, good: int, bad: int) -> None:
    """`good` inferences of ROWS rows each, then `bad` ones with a wrong shape."""
    client = grpcclient.InferenceServerClient(url)
    try:
        data = np.random.default_rng(0).random((ROWS, 8), dtype=np.float32)
        for _ in range(good):
            features = grpcclient.InferInput("features", [ROWS, 8], "FP32")
            features.set_data_from_numpy(data)
            client.infer(MODEL, [features])
        for _ in range(bad):
            wrong = grpcclient.InferInput("features", [ROWS, 9], "FP32")
            wrong.set_data_from_numpy(np.zeros((ROWS, 9), dtype=np.float32))
            with pytest.raises(InferenceServerException, match="unexpected shape"):
                client.infer(MODEL, [wrong])
    finally:
        client.close()


# ------------------------------------------------------------------ the files' queries


def load_rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load((PROMETHEUS_DIR / "alerts.yml").read_text())
    return [rule for group in doc["groups"] for rule in group["rules"]]


def dashboard_panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from dashboard_panels(panel.get("panels", []))


def dashboard_exprs() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [
        target["expr"]
        for panel in dashboard_panels(dashboard["panels"])
        for target in panel.get("targets", [])
        if target.get("expr")
    ]


LABEL_VALUES = re.compile(r"^label_values\(\s*([a-zA-Z_:][\w:]*)\s*,\s*(\w+)\s*\)$")


def dashboard_label_values() -> list[tuple[str, str]]:
    """(metric, label) of each `label_values(metric, label)` template variable."""
    dashboard = json.loads(DASHBOARD.read_text())
    found = []
    for variable in dashboard["templating"]["list"]:
        if variable["type"] != "query":
            continue
        query = variable["query"]
        text = query["query"] if isinstance(query, dict) else query
        m = LABEL_VALUES.match(text.strip())
        assert m, f"variable {variable['name']}: unexpected query {text!r}"
        found.append((m.group(1), m.group(2)))
    return found


def grafana_to_promql(expr: str) -> str:
    """A dashboard query as Grafana would send it, for MODEL over the last 5m."""
    out = expr.replace("$__rate_interval", "5m").replace("$model", MODEL)
    assert "$" not in out, f"unhandled Grafana variable in {expr!r}"
    return out


_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^()]*)\)")
_RANGE = re.compile(r"\[[^\]]*\]")
_SELECTOR = re.compile(r"(?<![\w:.])([a-zA-Z_:][\w:]*)\s*(\{[^{}]*\})?")
_MATCHER_LABEL = re.compile(r"([a-zA-Z_]\w*)\s*(?:=~|!~|!=|=)")
_KEYWORDS = frozenset(
    {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring"}
    | {"group_left", "group_right", "inf", "nan"}
)


def parse_promql(expr: str) -> tuple[dict[str, set[str]], set[str]]:
    """({metric name: label names in its matchers}, grouping label names) of a PromQL
    expression, by tokens: strings blanked, grouping clauses and ranges removed,
    function names (identifiers followed by '(') skipped."""
    text = _STRING.sub('""', expr)
    grouping = {
        label.strip() for m in _GROUPING.finditer(text) for label in m.group(1).split(",")
    } - {""}
    text = _RANGE.sub("", _GROUPING.sub(" ", text))
    selectors: dict[str, set[str]] = {}
    for m in _SELECTOR.finditer(text):
        name, matchers = m.group(1), m.group(2) or ""
        if name.lower() in _KEYWORDS or text[m.end() :].lstrip().startswith("("):
            continue
        selectors.setdefault(name, set()).update(_MATCHER_LABEL.findall(matchers))
    return selectors, grouping


def test_parse_promql_finds_names_and_labels() -> None:
    selectors, grouping = parse_promql(
        'histogram_quantile(0.99, sum by (model, le) (rate(x_bucket{model=~"$m",'
        ' phase="a{b}"}[$__rate_interval]))) / on(model) group_left y_total > bool 1e-3'
        ' or label_replace(z, "dst", "v", "", "")'
    )
    assert selectors == {"x_bucket": {"model", "phase"}, "y_total": set(), "z": set()}
    assert grouping == {"model", "le"}


# ----------------------------------------------------------------------- /metrics


def scrape(http_port: int) -> dict[str, set[str]]:
    """{sample name: label names seen on it} from sluice's /metrics."""
    samples: dict[str, set[str]] = {}
    for line in http_get(f"http://127.0.0.1:{http_port}/metrics").splitlines():
        if not line or line.startswith("#"):
            continue
        m = re.match(r"([a-zA-Z_:][\w:]*)(?:\{(.*)\})?\s", line)
        assert m, f"unparsable exposition line {line!r}"
        labels = set(re.findall(r'(\w+)="', m.group(2) or ""))
        samples.setdefault(m.group(1), set()).update(labels)
    return samples


# ------------------------------------------------------------------------ (a) promtool


def run_promtool(*args: str) -> None:
    promtool = require_binary("promtool")
    result = subprocess.run(
        [promtool, *args], cwd=PROMETHEUS_DIR, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, f"promtool {' '.join(args)}:\n{result.stdout}{result.stderr}"


def test_promtool_checks_config_and_rules() -> None:
    run_promtool("check", "config", "prometheus.yml")
    run_promtool("check", "rules", "alerts.yml")


def test_promtool_rule_unit_tests_pass() -> None:
    run_promtool("test", "rules", "alerts_test.yml")


def test_rule_unit_tests_cover_every_rule() -> None:
    """Every alert has a case where it fires and one where it must not; every
    recording rule is in some promql_expr_test."""
    doc = yaml.safe_load((PROMETHEUS_DIR / "alerts_test.yml").read_text())
    fires: set[str] = set()
    silent: set[str] = set()
    exprs: list[str] = []
    for case in doc["tests"]:
        for check in case.get("alert_rule_test", []):
            (fires if check.get("exp_alerts") else silent).add(check["alertname"])
        exprs += [check["expr"] for check in case.get("promql_expr_test", [])]
    rules = load_rules()
    alerts = {r["alert"] for r in rules if "alert" in r}
    assert alerts == {
        "SluiceP99LatencyHigh",
        "SluiceErrorRatioHigh",
        "SluiceQueueSaturated",
        "SluiceModelUnavailable",
        "SluiceFeatureDrift",
        "SluiceModelQualityDegraded",
    }
    assert alerts - fires == set(), "alerts without a firing test"
    assert alerts - silent == set(), "alerts without a must-not-fire test"
    for rule in rules:
        if "record" in rule:
            assert any(rule["record"] in parse_promql(e)[0] for e in exprs), rule["record"]
        if "alert" in rule:
            assert {"summary", "description"} <= set(rule["annotations"]), rule["alert"]
            assert rule["labels"]["severity"] in {"warning", "critical"}, rule["alert"]


# --------------------------------------------------------------- (b) real Prometheus


class PrometheusProcess:
    """`prometheus` on 127.0.0.1:<free port> with its data in a temporary folder."""

    def __init__(self, binary: str, config: Path, workdir: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = workdir / "prometheus.log"
        self._log = self.log_path.open("w")
        self.proc = subprocess.Popen(
            [
                binary,
                f"--config.file={config}",
                f"--storage.tsdb.path={workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=workdir,
        )

    def wait_ready(self) -> None:
        poll("Prometheus /-/ready", self._ready, timeout_s=30)

    def _ready(self) -> bool | None:
        if self.proc.poll() is not None:
            pytest.fail(f"prometheus exited with {self.proc.returncode}:\n{self.log()}")
        try:
            http_get(f"{self.url}/-/ready", timeout_s=2)
        except (urllib.error.URLError, ConnectionError):
            return None
        return True

    def log(self) -> str:
        return self.log_path.read_text()[-4000:]

    def api(self, path: str, **params: str) -> Any:
        query = urllib.parse.urlencode(params)
        body = json.loads(http_get(f"{self.url}/api/v1/{path}?{query}"))
        assert body["status"] == "success", body
        return body["data"]

    def query(self, promql: str) -> list[dict[str, Any]]:
        data = self.api("query", query=promql)
        assert data["resultType"] == "vector", (promql, data)
        result: list[dict[str, Any]] = data["result"]
        return result

    def value(self, promql: str) -> float | None:
        """The value of a query that returns one series; None while it returns none."""
        result = self.query(promql)
        assert len(result) <= 1, (promql, result)
        return float(result[0]["value"][1]) if result else None

    def stop(self) -> None:
        """SIGTERM by PID, SIGKILL if it has not exited after 20 s."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


@pytest.fixture
def start_prometheus(tmp_path: Path) -> Iterator[Callable[[int], PrometheusProcess]]:
    """Factory: start_prometheus(sluice_http_port) -> a Prometheus scraping it every
    second, with docker/prometheus/alerts.yml loaded. Stopped at teardown."""
    binary = require_binary("prometheus")  # before the test starts anything
    started: list[PrometheusProcess] = []

    def start(http_port: int) -> PrometheusProcess:
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(PROMETHEUS_DIR / "alerts.yml")],
            "scrape_configs": [
                {
                    "job_name": "sluice",
                    "static_configs": [{"targets": [f"127.0.0.1:{http_port}"]}],
                }
            ],
        }
        path = tmp_path / "prometheus.yml"
        path.write_text(yaml.safe_dump(config))
        prometheus = PrometheusProcess(binary, path, tmp_path)
        started.append(prometheus)
        prometheus.wait_ready()
        return prometheus

    yield start
    for p in started:
        p.stop()


def test_prometheus_scrapes_sluice(
    start_server: StartServer, start_prometheus: Callable[[int], PrometheusProcess]
) -> None:
    server = start_server(None, "--cost-per-hour", "3.6")
    prom = start_prometheus(server.http_port)
    # The first scrape lands about 5 s after start (service discovery's first update).
    poll("the first scrape of sluice", lambda: prom.value('up{job="sluice"}') == 1 or None)

    success = series("nv_inference_request_success")
    rejected = series("sluice_rejected_requests_total", reason="invalid_argument")
    # sluice creates sluice_rejected_requests_total{reason} at the first rejection of
    # that reason, so the series' first sample already counts it and rate() cannot see
    # it. A first bad request, scraped, makes the series exist before the traffic.
    send_traffic(server.url, good=0, bad=1)
    poll(f"{rejected} == 1", lambda: prom.value(rejected) == 1 or None, timeout_s=30)

    send_traffic(server.url, good=REQUESTS, bad=1)
    poll(
        f"{success} == {REQUESTS} and {rejected} == 2",
        lambda: (prom.value(success), prom.value(rejected)) == (REQUESTS, 2) or None,
        timeout_s=30,
    )
    expected = {
        success: REQUESTS,
        series("nv_inference_count"): REQUESTS * ROWS,
        series("nv_inference_exec_count"): REQUESTS,  # sequential: no batching
        series("sluice_batch_size_sum"): REQUESTS * ROWS,
        series("sluice_request_duration_seconds_count", phase="request"): REQUESTS,
        series("nv_inference_request_failure", reason="OTHER"): 2,
        rejected: 2,
        series("sluice_model_state", state="READY"): 1,
    }
    assert {q: prom.value(q) for q in expected} == expected
    for query in (f"increase({success}[5m])", f"rate({success}[5m])"):
        value = prom.value(query)
        assert value is not None, query
        assert value > 0, query
    cost = prom.value(series("sluice_inference_cost_usd_total"))
    assert cost is not None, "sluice_inference_cost_usd_total"
    assert cost > 0, "--cost-per-hour 3.6 charges the model's compute time"

    # The real alerts.yml: every rule evaluated on this data without error, and the
    # recording rules give the model's numbers.
    def rules_evaluated() -> list[dict[str, Any]] | None:
        groups = prom.api("rules")["groups"]
        rules = [rule for group in groups for rule in group["rules"]]
        bad = [r for r in rules if r["health"] == "err"]
        assert not bad, bad
        return rules if all(r["health"] == "ok" for r in rules) else None

    rules = poll("every rule in alerts.yml to be evaluated", rules_evaluated, timeout_s=30)
    assert len(rules) == len(load_rules())
    # Rules evaluate every second: wait for an evaluation that saw the traffic.
    recorded_rate = f'model:nv_inference_request_success:rate5m{{model="{MODEL}"}}'
    poll(f"{recorded_rate} > 0", lambda: prom.value(f"{recorded_rate} > 0"), timeout_s=30)
    recorded_p99 = (
        f'model_phase:sluice_request_duration_seconds:p99_rate5m{{model="{MODEL}",'
        ' phase="request"}'
    )
    p99 = poll(f"{recorded_p99} (not NaN)", lambda: prom.value(f"{recorded_p99} >= 0"))
    assert 0 < p99 < 0.5
    # 2 failed of 202 requests; both counters come from the same scrapes, so rate()'s
    # extrapolation cancels out of the ratio.
    ratio = f'model:nv_inference_request_error:ratio_rate5m{{model="{MODEL}"}}'
    poll(
        f"{ratio} == 2/202",
        lambda: abs((prom.value(ratio) or 0) - 2 / 202) < 1e-9 or None,
        timeout_s=30,
    )
    now = [rule for group in prom.api("rules")["groups"] for rule in group["rules"]]
    firing = [r["name"] for r in now if r["type"] == "alerting" and r["state"] != "inactive"]
    assert firing == [], "no alert is pending or firing for this healthy traffic"

    # Every dashboard query, as Grafana sends it for this model: it parses and has data.
    # (GPU panels are empty without NVML, drift panels without a profiled model.)
    for expr in dashboard_exprs():
        query = grafana_to_promql(expr)
        result = prom.query(query)
        profiled_only = all(ONLY_WHEN_USED.match(n) for n in parse_promql(expr)[0])
        if NVML_ONLY_PREFIX not in expr and not profiled_only:
            assert result, f"dashboard query returned no data: {query}"
    for metric, label in dashboard_label_values():
        values = prom.api(f"label/{label}/values", **{"match[]": metric})
        assert MODEL in values, (metric, label, values)


# ------------------------------------------------------------ (c) names in /metrics


def test_queried_metrics_exist_in_sluice_exposition(start_server: StartServer) -> None:
    server = start_server()
    send_traffic(server.url, good=3, bad=1)  # rejection counters appear on first use
    samples = scrape(server.http_port)
    all_labels = set().union(*samples.values()) | TARGET_LABELS
    nvml = any(name.startswith(NVML_ONLY_PREFIX) for name in samples)

    rules = load_rules()
    recorded = {r["record"] for r in rules if "record" in r}
    sources = [(f"alerts.yml {r.get('alert') or r['record']}", r["expr"]) for r in rules]
    sources += [(f"dashboard {expr[:60]}", expr) for expr in dashboard_exprs()]

    problems: list[str] = []
    used: set[str] = set()
    for where, expr in sources:
        selectors, grouping = parse_promql(expr)
        assert selectors, f"{where}: no metric found in {expr!r}"
        for name, labels in selectors.items():
            used.add(name)
            if name in recorded:
                continue
            if name not in samples:
                if ONLY_WHEN_USED.match(name):
                    continue
                if not (name.startswith(NVML_ONLY_PREFIX) and not nvml):
                    problems.append(f"{where}: {name} is not in /metrics")
                continue
            if missing := labels - samples[name] - TARGET_LABELS:
                problems.append(f"{where}: {name} has no label(s) {sorted(missing)}")
        if NVML_ONLY_PREFIX in expr and not nvml:
            continue  # the GPU gauges and their gpu_uuid label are absent without NVML
        if all(ONLY_WHEN_USED.match(name) for name in selectors):
            continue  # drift labels (feature, metric) exist only for profiled models
        if missing := grouping - all_labels:
            problems.append(f"{where}: grouping by unknown label(s) {sorted(missing)}")
    for metric, label in dashboard_label_values():
        used.add(metric)
        if label not in samples.get(metric, set()):
            problems.append(f"dashboard variable: {metric} has no label {label}")
    assert problems == [], "\n".join(problems)
    # The parser saw the families the dashboard is about (guards against a parser
    # that silently finds nothing).
    assert {
        "nv_inference_count",
        "nv_inference_request_failure",
        "sluice_request_duration_seconds_bucket",
        "sluice_batch_size_sum",
        "sluice_batch_size_count",
        "nv_inference_pending_request_count",
        "sluice_inflight_requests",
        "sluice_rejected_requests_total",
        "sluice_inference_cost_usd_total",
        "sluice_cost_per_1000_inferences_usd",
        "sluice_model_state",
        "nv_cpu_utilization",
        "nv_cpu_memory_used_bytes",
    } <= used
