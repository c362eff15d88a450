"""Prometheus metrics on a sluice-owned registry (never the global one). Every
metric is defined here, once.

Per-version numbers live in InferStats (updated on the event loop, no locks);
the collector turns them into metric families at scrape time, so the request
path pays nothing for Prometheus.

Names: Triton's (`nv_inference_*`, `nv_model_load_duration_secs`, `nv_cpu_*`,
`nv_gpu_*`) so existing dashboards work, plus `sluice_*` histograms per phase,
batch sizes, in-flight requests, rejections by reason, model state and cost.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import psutil
from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from sluice import _core
from sluice.monitoring.cost import CostModel
from sluice.monitoring.drift import SCORE_STATISTICS, DriftMonitor, skew_flags
from sluice.monitoring.stats import PHASES, REJECTION_REASONS, InferStats

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class VersionView:
    model: str
    version: str
    state: str  # lifecycle state name, e.g. "READY"
    queued: int  # requests waiting in the scheduler queue
    load_seconds: float
    stats: InferStats
    drift: DriftMonitor | None = None  # None: no drift profile
    executor: str = "thread"  # where its batches run (thread, process)
    executor_restarts: int = 0  # instances restarted after they died


_US = 1_000


class _TritonCounter(Metric):
    """A counter named exactly as Triton names it. prometheus_client adds
    `_total` to a CounterMetricFamily's samples; Triton's dashboards query
    `nv_inference_count`, not `nv_inference_count_total`."""

    def __init__(self, name: str, documentation: str, labels: list[str]) -> None:
        super().__init__(name, documentation, "counter")
        self._label_names = labels

    def add(self, values: list[str], value: float) -> None:
        self.add_sample(self.name, dict(zip(self._label_names, values, strict=True)), value)


class InferenceCollector(Collector):
    def __init__(self, versions: Callable[[], Iterable[VersionView]], cost: CostModel) -> None:
        self._versions = versions
        self._cost = cost

    def collect(self) -> Iterator[Metric]:
        lv = ["model", "version"]
        success = _TritonCounter(
            "nv_inference_request_success", "Successful inference requests", labels=lv
        )
        failure = _TritonCounter(
            "nv_inference_request_failure",
            "Failed inference requests by Triton's reason (REJECTED, CANCELED, BACKEND, OTHER)",
            labels=[*lv, "reason"],
        )
        count = _TritonCounter(
            "nv_inference_count", "Inferences performed (a batch of n counts n)", labels=lv
        )
        exec_count = _TritonCounter(
            "nv_inference_exec_count", "Model executions (batches run)", labels=lv
        )
        durations = {
            phase: _TritonCounter(
                f"nv_inference_{phase}_duration_us",
                f"Cumulative {phase.replace('_', ' ')} time of successful requests, in us",
                labels=lv,
            )
            for phase in PHASES
        }
        pending = GaugeMetricFamily(
            "nv_inference_pending_request_count", "Requests waiting in the queue", labels=lv
        )
        load = GaugeMetricFamily(
            "nv_model_load_duration_secs", "Seconds the version took to load and warm up", labels=lv
        )
        phase_hist = HistogramMetricFamily(
            "sluice_request_duration_seconds",
            "Latency of successful requests by phase (request = received to answered)",
            labels=[*lv, "phase"],
        )
        batch_hist = HistogramMetricFamily(
            "sluice_batch_size", "Rows per model execution", labels=lv
        )
        inflight = GaugeMetricFamily(
            "sluice_inflight_requests", "Requests accepted and not yet answered", labels=lv
        )
        rejected = CounterMetricFamily(
            "sluice_rejected_requests",
            "Requests refused or failed, by reason (every reason starts at 0)",
            labels=[*lv, "reason"],
        )
        state = GaugeMetricFamily(
            "sluice_model_state", "1 for the lifecycle state of each version", labels=[*lv, "state"]
        )
        cost = CounterMetricFamily(
            "sluice_inference_cost_usd",
            "Machine cost attributed to the version by the CPU time its executions used",
            labels=lv,
        )
        cost_1k = GaugeMetricFamily(
            "sluice_cost_per_1000_inferences_usd",
            "Attributed cost per 1000 inferences since start",
            labels=lv,
        )
        arms = CounterMetricFamily(
            "sluice_rollout_requests",
            "Unversioned requests routed to the version, by arm (stable, canary)",
            labels=[*lv, "arm"],
        )
        shadow = CounterMetricFamily(
            "sluice_shadow_comparisons",
            "Requests mirrored to the version as a shadow, by result "
            "(agree, disagree, error, skipped)",
            labels=[*lv, "result"],
        )
        rollbacks = CounterMetricFamily(
            "sluice_canary_rollbacks",
            "Automatic canary rollbacks of the version, by guard (error, p99, outputs)",
            labels=[*lv, "guard"],
        )
        restarts = CounterMetricFamily(
            "sluice_executor_restarts",
            "Executor instances of the version restarted after they died (process executors)",
            labels=[*lv, "executor"],
        )
        drift = _DriftFamilies()
        for v in self._versions():
            drift.add(v)
            key = [v.model, v.version]
            s = v.stats
            success.add(key, s.success.count)
            for reason, n in s.failures.items():
                failure.add([*key, reason], n)
            count.add(key, s.inference_count)
            exec_count.add(key, s.execution_count)
            durations["request"].add(key, s.success.ns // _US)
            durations["queue"].add(key, s.queue.ns // _US)
            durations["compute_input"].add(key, s.compute_input.ns // _US)
            durations["compute_infer"].add(key, s.compute_infer.ns // _US)
            durations["compute_output"].add(key, s.compute_output.ns // _US)
            pending.add_metric(key, v.queued)
            load.add_metric(key, v.load_seconds)
            for phase in PHASES:
                h = s.phases[phase]
                phase_hist.add_metric([*key, phase], h.cumulative(), h.sum)
            batch_hist.add_metric(key, s.batch_sizes.cumulative(), s.batch_sizes.sum)
            inflight.add_metric(key, s.inflight)
            for reason in REJECTION_REASONS:
                rejected.add_metric([*key, reason], s.rejections.get(reason, 0))
            state.add_metric([*key, v.state], 1)
            for arm, n in sorted(s.arms.items()):
                arms.add_metric([*key, arm], n)
            for result, n in sorted(s.shadow.items()):
                shadow.add_metric([*key, result], n)
            for guard, n in sorted(s.rollbacks.items()):
                rollbacks.add_metric([*key, guard], n)
            restarts.add_metric([*key, v.executor], v.executor_restarts)
            usd = self._cost.usd(s.core_ns)
            cost.add_metric(key, usd)
            if s.inference_count:
                cost_1k.add_metric(key, 1000 * usd / s.inference_count)
        yield from (success, failure, count, exec_count, *durations.values(), pending, load)
        yield from (phase_hist, batch_hist, inflight, rejected, state, cost, cost_1k)
        yield from (arms, shadow, rollbacks, restarts)
        yield from drift.families()


class _DriftFamilies:
    """Drift, skew and quality metrics (README "Drift monitoring"). The drift
    and quality families have samples only for versions with a drift profile;
    schema skew counts every version's refused requests."""

    def __init__(self) -> None:
        lv = ["model", "version"]
        self.score = GaugeMetricFamily(
            "sluice_drift_score",
            "Drift statistic of a feature's live window against its reference profile "
            "(psi, js, hellinger, ks_d, wasserstein_normed, p_adjusted, out_of_range_share, "
            "unseen_share); outputs are features named output:<name>[i]",
            labels=[*lv, "feature", "statistic"],
        )
        self.detected = GaugeMetricFamily(
            "sluice_drift_detected",
            "1 when the feature drifts by the verdict rule (PSI >= 0.2 and BH-adjusted "
            "p < 0.05), else 0 (also while the window has too few rows)",
            labels=[*lv, "feature"],
        )
        self.rows = GaugeMetricFamily(
            "sluice_drift_window_rows", "Rows in the version's live drift window", labels=lv
        )
        self.skew = GaugeMetricFamily(
            "sluice_feature_skew",
            "1 when a feature's serving statistics are far from training (scale, location, "
            "range: e.g. a feature scaled in training but not in serving)",
            labels=[*lv, "feature", "kind"],
        )
        self.schema = CounterMetricFamily(
            "sluice_schema_skew",
            "Requests refused for a mismatch with the model signature, by input and kind "
            "(name, datatype, shape)",
            labels=[*lv, "input", "kind"],
        )
        self.quality = GaugeMetricFamily(
            "sluice_model_quality",
            "Rolling prediction quality from Feedback ground truth (accuracy, mae, rmse)",
            labels=[*lv, "metric"],
        )
        self.degraded = GaugeMetricFamily(
            "sluice_model_quality_degraded",
            "1 when the rolling quality is worse than the metadata.json baseline "
            "(accuracy - 0.05, or 1.2 x mae/rmse)",
            labels=lv,
        )

    def add(self, v: VersionView) -> None:
        key = [v.model, v.version]
        for (input_name, kind), n in sorted(v.stats.schema_skew.items()):
            self.schema.add_metric([*key, input_name, kind], n)
        monitor = v.drift
        if monitor is None:
            return
        reports = monitor.statistics()
        if reports:  # rows as of now (old panes expired), of the first tensor
            self.rows.add_metric(key, reports[0][1].rows)
        for tp, report in reports:
            assert tp.profile is not None
            numeric = _core.FeatureKind.NUMERIC
            for i, (name, f) in enumerate(zip(tp.features, report.features, strict=True)):
                for stat in SCORE_STATISTICS:
                    value = float(getattr(f, stat))
                    if math.isfinite(value):
                        self.score.add_metric([*key, name, stat], value)
                self.detected.add_metric(
                    [*key, name], 1.0 if f.verdict == _core.Verdict.DRIFT else 0.0
                )
                if f.kind == numeric:
                    flags = skew_flags(tp.profile.numeric(i), f)
                    for kind in ("scale", "location", "range"):
                        self.skew.add_metric([*key, name, kind], 1.0 if kind in flags else 0.0)
        q = monitor.quality
        if q is not None:
            for metric, value in q.metrics().items():
                self.quality.add_metric([*key, metric], value)
            self.degraded.add_metric(key, 1.0 if q.degraded()[0] else 0.0)

    def families(self) -> Iterator[Metric]:
        yield from (self.score, self.detected, self.rows, self.skew, self.schema)
        yield from (self.quality, self.degraded)


class HostCollector(Collector):
    """Triton's host gauges: CPU utilisation and memory; NVML GPU gauges when present."""

    def __init__(self) -> None:
        psutil.cpu_percent(interval=None)  # primes the first interval
        self._nvml: Any = _init_nvml()

    def collect(self) -> Iterator[Metric]:
        cpu = GaugeMetricFamily("nv_cpu_utilization", "CPU utilisation since the last scrape, 0..1")
        cpu.add_metric([], psutil.cpu_percent(interval=None) / 100.0)
        mem = psutil.virtual_memory()
        total = GaugeMetricFamily("nv_cpu_memory_total_bytes", "Host memory, bytes")
        total.add_metric([], mem.total)
        used = GaugeMetricFamily("nv_cpu_memory_used_bytes", "Host memory in use, bytes")
        used.add_metric([], mem.total - mem.available)
        yield from (cpu, total, used)
        if self._nvml is not None:
            yield from _gpu_metrics(self._nvml)


def _init_nvml() -> Any:
    """pynvml (nvidia-ml-py) if installed and a driver answers; else None."""
    try:
        import pynvml  # type: ignore[import-not-found]

        pynvml.nvmlInit()
    except Exception:  # no package, no driver, no GPU: GPU gauges are simply absent
        return None
    return pynvml


def _gpu_metrics(nvml: Any) -> Iterator[Metric]:
    lg = ["gpu_uuid"]
    util = GaugeMetricFamily("nv_gpu_utilization", "GPU utilisation, 0..1", labels=lg)
    total = GaugeMetricFamily("nv_gpu_memory_total_bytes", "GPU memory, bytes", labels=lg)
    used = GaugeMetricFamily("nv_gpu_memory_used_bytes", "GPU memory in use, bytes", labels=lg)
    power = GaugeMetricFamily("nv_gpu_power_usage", "GPU power draw, watts", labels=lg)
    try:
        for i in range(nvml.nvmlDeviceGetCount()):
            h = nvml.nvmlDeviceGetHandleByIndex(i)
            uuid = nvml.nvmlDeviceGetUUID(h)
            uuid = uuid.decode() if isinstance(uuid, bytes) else str(uuid)
            util.add_metric([uuid], nvml.nvmlDeviceGetUtilizationRates(h).gpu / 100.0)
            m = nvml.nvmlDeviceGetMemoryInfo(h)
            total.add_metric([uuid], m.total)
            used.add_metric([uuid], m.used)
            power.add_metric([uuid], nvml.nvmlDeviceGetPowerUsage(h) / 1000.0)
    except Exception as exc:  # a GPU that stops answering must not break /metrics
        log.warning("NVML query failed: %s", exc)
    yield from (util, total, used, power)


def build_registry(
    versions: Callable[[], Iterable[VersionView]], version: str, cost: CostModel
) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    info = InfoMetricFamily("sluice_build", "sluice build information")
    info.add_metric([], {"version": version})

    class _Build(Collector):
        def collect(self) -> Iterator[Metric]:
            yield info

    registry.register(_Build())
    registry.register(InferenceCollector(versions, cost))
    registry.register(HostCollector())
    return registry
