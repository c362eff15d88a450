"""Prometheus metrics on a sluice-owned registry (never the global one).

Per-version counters are read from InferStats at scrape time by a collector,
so the request path pays nothing for them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

from prometheus_client import CollectorRegistry, Info
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from sluice.monitoring.stats import InferStats

# (model, version, state, queued requests, stats); state is the lifecycle name.
VersionView = tuple[str, str, str, int, InferStats]


class InferenceCollector(Collector):
    def __init__(self, versions: Callable[[], Iterable[VersionView]]) -> None:
        self._versions = versions

    def collect(self) -> Iterator[Metric]:
        labels = ["model", "version"]
        success = CounterMetricFamily(
            "nv_inference_request_success", "Successful inference requests", labels=labels
        )
        failure = CounterMetricFamily(
            "nv_inference_request_failure", "Failed inference requests", labels=labels
        )
        count = CounterMetricFamily(
            "nv_inference_count", "Inferences performed (a batch of n counts n)", labels=labels
        )
        exec_count = CounterMetricFamily(
            "nv_inference_exec_count", "Model executions (batches run)", labels=labels
        )
        durations = {
            name: CounterMetricFamily(
                f"nv_inference_{name}_duration_us", f"Cumulative {name} time in us", labels=labels
            )
            for name in ("request", "queue", "compute_input", "compute_infer", "compute_output")
        }
        pending = GaugeMetricFamily(
            "nv_inference_pending_request_count",
            "Requests waiting in the scheduler queue",
            labels=labels,
        )
        state = GaugeMetricFamily(
            "sluice_model_state",
            "1 for the lifecycle state each model version is in",
            labels=[*labels, "state"],
        )
        for model, version, state_name, queued, s in self._versions():
            lv = [model, version]
            success.add_metric(lv, s.success.count)
            failure.add_metric(lv, s.fail.count)
            count.add_metric(lv, s.inference_count)
            exec_count.add_metric(lv, s.execution_count)
            durations["request"].add_metric(lv, (s.success.ns + s.fail.ns) // 1000)
            durations["queue"].add_metric(lv, s.queue.ns // 1000)
            durations["compute_input"].add_metric(lv, s.compute_input.ns // 1000)
            durations["compute_infer"].add_metric(lv, s.compute_infer.ns // 1000)
            durations["compute_output"].add_metric(lv, s.compute_output.ns // 1000)
            pending.add_metric(lv, queued)
            state.add_metric([*lv, state_name], 1)
        yield from (success, failure, count, exec_count, *durations.values(), pending, state)


def build_registry(
    versions: Callable[[], Iterable[VersionView]], version: str
) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    Info("sluice_build", "sluice build information", registry=registry).info({"version": version})
    registry.register(InferenceCollector(versions))
    return registry
