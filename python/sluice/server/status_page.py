"""The status page at `/` and `/status` on the HTTP port: what an on-call
engineer needs at a glance, server-rendered HTML with no script and no build step.

Cost. A render reads only what the host keeps in memory (model and version
states, labels, InferStats counters, the scheduler's queue depth, the drift
windows); it never lists the repository, reads labels.json or builds a full drift
report. The last minute's numbers are differences of cumulative counters
(monitoring/window.py): a timer on the event loop copies every version's
counters into a ring every 5 s (a few ints per version), and a render subtracts
the sample a minute old from a fresh one. The loop only copies numbers
(`collect`); drift statistics (C++, GIL released; each version's reused for
DRIFT_REFRESH_S) and the HTML are made on one worker thread (`render`), and a
rendered page is reused for MIN_RENDER_INTERVAL_S whoever asks, so viewers
cannot make the server render more than once a second.

Every value that reaches the page is escaped: model names, reasons and labels
history come from the repository and from clients.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import html
import importlib.resources
import logging
import math
import random
import time
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING

from aiohttp import web

from sluice import _core
from sluice.monitoring.cost import CostModel
from sluice.monitoring.stats import LATENCY_BUCKETS_S, InferStats
from sluice.monitoring.window import Counts, Key, Sample, Window, quantile_s
from sluice.repository.registry.labels import CANARY, SHADOW, STABLE

if TYPE_CHECKING:
    from sluice.host.dataplane import DataPlane
    from sluice.host.lifecycle import Model, ModelVersion
    from sluice.monitoring.drift import DriftMonitor

log = logging.getLogger(__name__)

PATHS = ("/", "/status")
DASHBOARD_PATH = "/status/grafana-dashboard.json"
# The Grafana dashboard that docker/ provisions, installed into the package by
# CMakeLists.txt (absent from a source tree that was never built).
DASHBOARD_RESOURCE = ("grafana", "sluice-dashboard.json")

REFRESH_S = 5
MIN_RENDER_INTERVAL_S = 1.0
# Bounds the page (and a render's cost) on a repository with very many models.
MAX_MODELS_SHOWN = 500
COLLECT_SLICE = 10  # models read per turn of the event loop
MAX_REASON_CHARS = 400
MAX_NAMES_LISTED = 5
DRIFT_REFRESH_S = 15.0
NONE = "\N{EN DASH}"  # a cell with nothing to show


@dataclasses.dataclass(frozen=True)
class ServerFacts:
    """What the composition root knows about the server (ports may be bound late)."""

    version: str
    host: str
    grpc_port: int
    http_port: int
    metrics: bool  # /metrics is served (--allow-metrics)
    cost: CostModel
    frontends: int = 1  # gRPC frontend processes (--frontends)


# ---- what a render shows (plain data, collected on the loop) ---------------------------


@dataclasses.dataclass(frozen=True)
class Traffic:
    """One version's (or model's) last window."""

    span_s: float
    counts: Counts
    queued: int
    inflight: int
    detailed: bool  # latency histograms recorded (off with --allow-metrics false)

    @property
    def requests(self) -> int:
        return self.counts.success + self.counts.failed

    @property
    def rate_per_s(self) -> float:
        return self.requests / self.span_s if self.span_s > 0 else 0.0

    @property
    def error_rate(self) -> float | None:
        return self.counts.failed / self.requests if self.requests else None

    @property
    def avg_batch(self) -> float | None:
        c = self.counts
        return c.inferences / c.executions if c.executions else None

    def quantile_s(self, q: float) -> float | None:
        return quantile_s(self.counts.latency, q) if self.detailed else None

    def plus(self, other: Traffic) -> Traffic:
        return Traffic(
            max(self.span_s, other.span_s),
            self.counts.plus(other.counts),
            self.queued + other.queued,
            self.inflight + other.inflight,
            self.detailed and other.detailed,
        )


@dataclasses.dataclass(frozen=True)
class VersionStatus:
    version: int
    state: str
    reason: str
    labels: tuple[str, ...]
    traffic: Traffic
    inferences_total: int
    core_ns_total: int
    drift_monitor: DriftMonitor | None  # read on the render thread (the core locks)
    drift_reason: str  # why there is no drift monitoring
    quality: str  # from Feedback, summarised on the loop (it reads a deque the loop writes)


@dataclasses.dataclass(frozen=True)
class RolloutStatus:
    stable: int | None
    canary: str  # "" when none
    shadow: str
    guard: str  # the live guard's state, or the last canary decision


@dataclasses.dataclass(frozen=True)
class ModelStatus:
    name: str
    ready: bool
    reason: str  # why no version serves
    versions: tuple[VersionStatus, ...]
    rollout: RolloutStatus | None


@dataclasses.dataclass(frozen=True)
class PageData:
    facts: ServerFacts
    uptime_s: float
    window_s: float
    ready: bool
    models: tuple[ModelStatus, ...]
    models_total: int
    dashboard: bool
    unavailable: tuple[str, ...] = ()  # models that should serve and cannot
    collect_s: float = 0.0  # time `collect` held the event loop, all slices
    collect_longest_s: float = 0.0  # its longest slice
    collect_cpu_s: float = 0.0  # the loop thread's CPU time in them (no preemption)


def _model_versions(dp: DataPlane) -> Iterable[tuple[Key, InferStats]]:
    for m in list(dp.models.models.values()):
        for v in list(m.versions.values()):
            yield (m.name, v.version), v.stats


def _quality(mv: ModelVersion) -> str:
    monitor = mv.drift
    if monitor is None or monitor.quality is None:
        return ""
    q = monitor.quality
    if not q.errors:
        return "no feedback yet"
    metrics = ", ".join(f"{k} {v:.3g}" for k, v in q.metrics().items())
    degraded, why = q.degraded()
    status = f"DEGRADED: {why}" if degraded else (why or "within baseline")
    return f"{metrics} over {len(q.errors)} labelled; {status}"


def _guard(model: Model) -> str:
    guard = model.guard
    if guard is not None and model.labels.canary is not None:
        n = len(guard.canary)
        errors = sum(not o.ok for o in guard.canary)
        compared = len(guard.agreement)
        disagree = sum(not a for a in guard.agreement)
        lim = guard.limits
        state = (
            f"judging from {lim.min_requests} requests"
            if n < lim.min_requests
            else "healthy, no rollback"
        )
        return (
            f"watching: {n} canary requests ({errors} failed), {compared} compared with "
            f"stable ({disagree} disagree); {state}"
        )
    for entry in reversed(model.labels.history):
        if entry.label == CANARY:
            detail = f": {entry.detail}" if entry.detail else ""
            return f"version {entry.version} {entry.action} at {entry.at}{detail}"
    return ""


def _rollout(model: Model) -> RolloutStatus | None:
    labels = model.labels
    if labels.stable is None and labels.canary is None and labels.shadow is None:
        guard = _guard(model)
        return RolloutStatus(None, "", "", guard) if guard else None
    canary = ""
    if labels.canary is not None:
        c = labels.canary
        canary = f"version {c.version} at weight {c.weight:g}{' (sticky)' if c.sticky else ''}"
    shadow = ""
    if labels.shadow is not None:
        shadow = f"version {labels.shadow.version}, sample {labels.shadow.sample:g}"
    return RolloutStatus(labels.stable, canary, shadow, _guard(model))


def _model_status(model: Model, base: Sample | None, span_s: float) -> ModelStatus:
    versions = []
    for v, mv in sorted(model.versions.items()):
        scheduler = mv.scheduler
        traffic = Traffic(
            span_s,
            Window.since(base, (model.name, v), mv.stats),
            scheduler.queued_requests if scheduler is not None else 0,
            mv.stats.inflight,
            mv.stats.detailed,
        )
        reason = mv.reason
        if v in model.failed_reloads:
            reason = f"reload failed, the loaded one serves: {model.failed_reloads[v]}"
        versions.append(
            VersionStatus(
                v,
                mv.state.value,
                reason,
                tuple(model.labels.labels_of(v)),
                traffic,
                mv.stats.inference_count,
                mv.stats.core_ns,
                mv.drift,
                mv.drift_reason,
                _quality(mv),
            )
        )
    ready = bool(model.ready_versions())
    return ModelStatus(
        model.name,
        ready,
        "" if ready else model.unavailable_reason(),
        tuple(versions),
        _rollout(model),
    )


async def collect(
    dp: DataPlane, facts: ServerFacts, window: Window, started_ns: int, dashboard: bool
) -> PageData:
    """Everything the page shows, read on the event loop (the owner of these
    structures): copies of counters and labels, no I/O, no statistics. It
    yields to the loop after every COLLECT_SLICE models, so a large repository
    never holds the loop for long; each model is read whole within one slice."""
    started_s, started_cpu_s = time.perf_counter(), time.thread_time()
    busy_s = longest_s = cpu_s = 0.0
    now_ns = _core.monotonic_ns()
    base = window.base(now_ns)
    span_s = (now_ns - (base.t_ns if base is not None else started_ns)) * 1e-9
    names = sorted(dp.models.models)
    models = []
    for i, name in enumerate(names[:MAX_MODELS_SHOWN]):
        if i and i % COLLECT_SLICE == 0:
            took_s = time.perf_counter() - started_s
            busy_s, longest_s = busy_s + took_s, max(longest_s, took_s)
            cpu_s += time.thread_time() - started_cpu_s
            await asyncio.sleep(0)
            started_s, started_cpu_s = time.perf_counter(), time.thread_time()
        model = dp.models.models.get(name)
        if model is not None:  # not removed meanwhile
            models.append(_model_status(model, base, span_s))
    data = PageData(
        facts,
        (now_ns - started_ns) * 1e-9,
        span_s,
        dp.server_ready(),
        tuple(models),
        len(names),
        dashboard,
        tuple(sorted(dp.models.unavailable())),
    )
    took_s = time.perf_counter() - started_s
    return dataclasses.replace(
        data,
        collect_s=busy_s + took_s,
        collect_longest_s=max(longest_s, took_s),
        collect_cpu_s=cpu_s + time.thread_time() - started_cpu_s,
    )


# ---- HTML (the render thread) -----------------------------------------------------


def e(value: object) -> str:
    """Every value on the page goes through here."""
    return html.escape(str(value), quote=True)


def _clip(text: str) -> str:
    return text if len(text) <= MAX_REASON_CHARS else text[: MAX_REASON_CHARS - 1] + "…"


def _ms(seconds: float | None) -> str:
    if seconds is None:
        return NONE
    if math.isinf(seconds):
        return f"> {LATENCY_BUCKETS_S[-1]:g} s"
    ms = seconds * 1e3
    return f"{ms:.2f} ms" if ms < 10 else f"{ms:.1f} ms" if ms < 100 else f"{ms:.0f} ms"


def _pct(x: float | None) -> str:
    return NONE if x is None else f"{x:.1%}"


def _num(x: float | None, spec: str = ".1f") -> str:
    return NONE if x is None else format(x, spec)


def _duration(seconds: float) -> str:
    s = int(seconds)
    d, s = divmod(s, 86400)
    h, s = divmod(s, 3600)
    m, s = divmod(s, 60)
    return f"{d}d {h}h {m}m" if d else f"{h}h {m}m {s}s" if h else f"{m}m {s}s"


def _cost_per_1k(cost: CostModel, core_ns: int, inferences: int) -> str:
    if cost.usd_per_hour <= 0 and (cost.usd_per_gpu_hour <= 0 or cost.gpus <= 0):
        return "not priced (--cost-per-hour)"
    if inferences <= 0:
        return NONE
    return f"${1000 * cost.usd(core_ns) / inferences:.3g}"


def drift_summary(v: VersionStatus) -> str:
    """The drift verdict of a profiled version (statistics computed here, on the
    render thread: the core serialises them with the windows' updates)."""
    monitor = v.drift_monitor
    if monitor is None:
        return "not profiled" if "no drift profile" in v.drift_reason else v.drift_reason
    reports = monitor.statistics()
    if not reports:
        return "no profiled tensor"
    drifted: list[str] = []
    evaluated = 0
    insufficient = True
    for tp, report in reports:
        evaluated += report.evaluated
        if report.dataset != _core.Verdict.INSUFFICIENT_DATA:
            insufficient = False
        for name, f in zip(tp.features, report.features, strict=True):
            if f.verdict == _core.Verdict.DRIFT:
                drifted.append(name)
    rows = reports[0][1].rows
    if insufficient:
        return f"too few rows yet ({rows} in the window)"
    if drifted:
        names = ", ".join(drifted[:MAX_NAMES_LISTED])
        more = (
            f" and {len(drifted) - MAX_NAMES_LISTED} more"
            if len(drifted) > MAX_NAMES_LISTED
            else ""
        )
        return f"DRIFT in {len(drifted)} of {evaluated} features ({names}{more}); {rows} rows"
    return f"no drift ({evaluated} features, {rows} rows)"


class DriftVerdicts:
    """Drift verdicts by version, recomputed at most every `refresh_s`: the
    statistics cost about 0.7 ms of CPU per profiled version (two tensors, on
    this project's 2-core VM), and a verdict moves with the window's panes
    (10 s by default), not with every render. A version's first verdict is
    dated a random part of `refresh_s` back, so refreshes spread over renders
    instead of all falling due in the same one. Render thread only."""

    def __init__(self, refresh_s: float = DRIFT_REFRESH_S) -> None:
        self.refresh_ns = int(refresh_s * 1e9)
        self._verdicts: dict[Key, tuple[DriftMonitor, int, str]] = {}
        self._rng = random.Random()

    def of(self, model: str, v: VersionStatus) -> str:
        monitor = v.drift_monitor
        if monitor is None:
            return drift_summary(v)
        key = (model, v.version)
        now_ns = _core.monotonic_ns()
        known = self._verdicts.get(key)
        if known is not None and known[0] is monitor and now_ns - known[1] < self.refresh_ns:
            return known[2]
        try:
            text = drift_summary(v)
        except Exception as exc:  # a window the core cannot evaluate must not lose the page
            text = f"cannot evaluate: {exc}"
        if known is None and self.refresh_ns > 0:
            now_ns -= self._rng.randrange(self.refresh_ns)
        self._verdicts[key] = (monitor, now_ns, text)
        return text

    def keep_only(self, keys: set[Key]) -> None:
        """Forgets versions no longer shown (bounded by the models shown)."""
        for key in [k for k in self._verdicts if k not in keys]:
            del self._verdicts[key]


_STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.2em;color:#1b1f24;background:#fff}
h1{font-size:1.4em;margin:0 0 .3em}h2{font-size:1.1em;margin:1.2em 0 .4em}
table{border-collapse:collapse;margin:.2em 0 1em}
th,td{border:1px solid #d0d7de;padding:.25em .5em;text-align:left;vertical-align:top}
th{background:#f3f5f7}td.n{text-align:right;font-variant-numeric:tabular-nums}
.READY,.ok{color:#116329;font-weight:600}.UNAVAILABLE,.bad{color:#b3261e;font-weight:600}
.LOADING,.UNLOADING,.UNLOADED,.warn{color:#8a5a00;font-weight:600}
.muted{color:#57606a}.facts span{margin-right:1.4em}
"""


def _row(cells: Sequence[str], numeric: Sequence[bool] = ()) -> str:
    out = []
    for i, c in enumerate(cells):
        cls = ' class="n"' if i < len(numeric) and numeric[i] else ""
        out.append(f"<td{cls}>{c}</td>")
    return "<tr>" + "".join(out) + "</tr>"


def _traffic_cells(t: Traffic) -> list[str]:
    return [
        e(f"{t.rate_per_s:.1f}"),
        e(_pct(t.error_rate)),
        e(_ms(t.quantile_s(0.5))),
        e(_ms(t.quantile_s(0.99))),
        e(_num(t.avg_batch, ".2f")),
        e(t.queued),
    ]


def render(data: PageData, drift: DriftVerdicts | None = None) -> str:
    """The page. Runs on the render thread; reads only `data` (and the drift
    windows through the core). The footer says what the render cost."""
    started_s, started_cpu_s = time.perf_counter(), time.thread_time()
    f = data.facts
    state = '<span class="ok">ready</span>' if data.ready else '<span class="bad">NOT READY</span>'
    if not data.ready and data.unavailable:
        shown = ", ".join(data.unavailable[:MAX_NAMES_LISTED])
        more = len(data.unavailable) - MAX_NAMES_LISTED
        state += e(f" (unavailable: {shown}{f' and {more} more' if more > 0 else ''})")
    links = []
    if f.metrics:
        links.append('<a href="/metrics">/metrics</a> (Prometheus)')
    if data.dashboard:
        links.append(f'<a href="{e(DASHBOARD_PATH)}">Grafana dashboard JSON</a>')
    else:
        links.append("Grafana dashboard: docker/grafana/sluice-dashboard.json in the source tree")
    window = f"last {data.window_s:.0f} s"
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f'<meta http-equiv="refresh" content="{REFRESH_S}">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>sluice {e(f.version)} status</title><style>{_STYLE}</style></head><body>",
        f"<h1>sluice {e(f.version)}: {state}</h1>",
        '<p class="facts">',
        f"<span>uptime {e(_duration(data.uptime_s))}</span>",
        f"<span>gRPC {e(f.host)}:{e(f.grpc_port or 'not listening yet')}"
        f"{e(f' ({f.frontends} frontend processes)' if f.frontends > 1 else '')}</span>",
        f"<span>HTTP {e(f.host)}:{e(f.http_port)}</span>",
        f"<span>{e(len(data.models))} of {e(data.models_total)} models shown</span>",
        "</p>",
        f"<p>{' · '.join(links)} · refreshes every {REFRESH_S} s</p>",
    ]
    parts += _models_table(data, window)
    drift = drift if drift is not None else DriftVerdicts(refresh_s=0)
    parts += _versions_table(data, window, drift)
    drift.keep_only({(m.name, v.version) for m in data.models for v in m.versions})
    parts.append(
        '<p class="muted">req/s counts every request a version ran, including the copies '
        "a canary's or a shadow's comparison sends to it (as nv_inference_request_success "
        "does); a model's row sums its versions. errors: failed / all; p50, p99: the "
        "request time of successful requests (from the latency histogram's buckets); queue: "
        "requests waiting now.</p>"
    )
    parts += _rollouts_table(data)
    if data.models_total > len(data.models):
        parts.append(
            f'<p class="warn">{e(data.models_total - len(data.models))} more models are not '
            "shown; /v2/repository/index lists every one.</p>"
        )
    took_ms = (time.perf_counter() - started_s) * 1e3
    cpu_ms = (time.thread_time() - started_cpu_s) * 1e3
    parts.append(
        f'<p class="muted" id="rendered">rendered at {e(wall_clock())} in {took_ms:.2f} ms '
        f"({cpu_ms:.2f} ms CPU on the render thread; on the event loop "
        f"{data.collect_s * 1e3:.2f} ms ({data.collect_cpu_s * 1e3:.2f} ms CPU), at most "
        f"{data.collect_longest_s * 1e3:.2f} ms at a time)</p></body></html>"
    )
    return "\n".join(parts)


def _models_table(data: PageData, window: str) -> list[str]:
    cost = data.facts.cost
    out = [
        f"<h2>Models ({e(window)})</h2><table><thead><tr><th>model</th><th>state</th>"
        "<th>req/s</th><th>errors</th><th>p50</th><th>p99</th><th>avg batch</th>"
        "<th>queue</th><th>cost / 1k inferences</th><th>reason</th></tr></thead><tbody>"
    ]
    numeric = (False, False, True, True, True, True, True, True, True, False)
    for m in data.models:
        traffic = Traffic(data.window_s, Counts(), 0, 0, True)
        inferences = core_ns = 0
        for v in m.versions:
            traffic = traffic.plus(v.traffic)
            inferences += v.inferences_total
            core_ns += v.core_ns_total
        state = "READY" if m.ready else "UNAVAILABLE"
        cells = [
            e(m.name),
            f'<span class="{state}">{state}</span>',
            *_traffic_cells(traffic),
            e(_cost_per_1k(cost, core_ns, inferences)),
            e(_clip(m.reason)),
        ]
        out.append(_row(cells, numeric))
    out.append("</tbody></table>")
    return out


def _versions_table(data: PageData, window: str, verdicts: DriftVerdicts) -> list[str]:
    out = [
        f"<h2>Versions ({e(window)})</h2><table><thead><tr><th>model</th><th>version</th>"
        "<th>state</th><th>labels</th><th>req/s</th><th>errors</th><th>p50</th><th>p99</th>"
        f"<th>avg batch</th><th>queue</th><th>drift (every {DRIFT_REFRESH_S:g} s)</th>"
        "<th>quality (feedback)</th>"
        "<th>reason</th></tr></thead><tbody>"
    ]
    numeric = (False, True, False, False, True, True, True, True, True, True)
    for m in data.models:
        for v in m.versions:
            drift = verdicts.of(m.name, v)
            cells = [
                e(m.name),
                e(v.version),
                f'<span class="{e(v.state)}">{e(v.state)}</span>',
                e(", ".join(v.labels) or NONE),
                *_traffic_cells(v.traffic),
                e(_clip(drift)),
                e(_clip(v.quality) or NONE),
                e(_clip(v.reason)),
            ]
            out.append(_row(cells, numeric))
    out.append("</tbody></table>")
    return out


def _rollouts_table(data: PageData) -> list[str]:
    rows = [(m.name, m.rollout) for m in data.models if m.rollout is not None]
    if not rows:
        return ['<h2>Rollouts</h2><p class="muted">No model has rollout labels.</p>']
    out = [
        f"<h2>Rollouts</h2><table><thead><tr><th>model</th><th>{STABLE}</th><th>{CANARY}</th>"
        f"<th>{SHADOW}</th><th>last guard decision</th></tr></thead><tbody>"
    ]
    for name, r in rows:
        assert r is not None
        stable = f"version {r.stable}" if r.stable is not None else "latest ready"
        out.append(
            _row([e(name), e(stable), e(r.canary or NONE), e(r.shadow or NONE), e(_clip(r.guard))])
        )
    out.append("</tbody></table>")
    return out


# ---- serving -------------------------------------------------------------------------


def _dashboard_bytes() -> bytes | None:
    try:
        return importlib.resources.files("sluice").joinpath(*DASHBOARD_RESOURCE).read_bytes()
    except (OSError, ValueError):  # a source tree that was never built and installed
        return None


class StatusPage:
    """Serves the page from the REST server's aiohttp app (`register`). Its
    sampling timer and render thread live from the app's start-up to its cleanup."""

    def __init__(self, dataplane: DataPlane, facts: Callable[[], ServerFacts]) -> None:
        self._dp = dataplane
        self._facts = facts
        self._started_ns = _core.monotonic_ns()
        self.window = Window()
        self._dashboard = _dashboard_bytes()
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._drift = DriftVerdicts()  # used on the render thread only
        self._sampler: asyncio.Task[None] | None = None
        self._page: tuple[int, bytes] | None = None  # (monotonic ns, body)
        self._rendering: asyncio.Future[bytes] | None = None  # the render in progress

    def register(self, app: web.Application) -> None:
        for path in PATHS:
            app.router.add_get(path, self._handle)
        if self._dashboard is not None:
            app.router.add_get(DASHBOARD_PATH, self._handle_dashboard)
        app.on_startup.append(self._start)
        app.on_cleanup.append(self._stop)

    async def _start(self, app: web.Application) -> None:
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="sluice-status")
        self._sampler = asyncio.create_task(self._sample_forever(), name="sluice-status-sampler")

    async def _stop(self, app: web.Application) -> None:
        if self._sampler is not None:
            self._sampler.cancel()
        if self._pool is not None:
            self._pool.shutdown(wait=False)

    async def _sample_forever(self) -> None:
        while True:
            self.window.add(Window.sample(_core.monotonic_ns(), _model_versions(self._dp)))
            await asyncio.sleep(self.window.period_s)

    async def collect(self) -> PageData:
        return await collect(
            self._dp, self._facts(), self.window, self._started_ns, self._dashboard is not None
        )

    async def body(self) -> bytes:
        """The page, rendered at most once per MIN_RENDER_INTERVAL_S; concurrent
        requests share one render, which a client that goes away does not cancel."""
        now_ns = _core.monotonic_ns()
        if self._page is not None and now_ns - self._page[0] < MIN_RENDER_INTERVAL_S * 1e9:
            return self._page[1]
        if self._rendering is None:
            self._rendering = asyncio.ensure_future(self._render())
            self._rendering.add_done_callback(self._rendered)
        return await asyncio.shield(self._rendering)

    async def _render(self) -> bytes:
        data = await self.collect()  # on the loop: copies only
        loop = asyncio.get_running_loop()
        text = await loop.run_in_executor(self._pool, render, data, self._drift)
        page = text.encode()
        self._page = (_core.monotonic_ns(), page)
        return page

    def _rendered(self, task: asyncio.Future[bytes]) -> None:
        self._rendering = None
        if not task.cancelled() and task.exception() is not None:
            log.error("status page render failed: %r", task.exception())

    async def _handle(self, request: web.Request) -> web.Response:
        return web.Response(
            body=await self.body(),
            content_type="text/html",
            charset="utf-8",
            headers={"Cache-Control": "no-store"},
        )

    async def _handle_dashboard(self, request: web.Request) -> web.Response:
        assert self._dashboard is not None
        return web.Response(body=self._dashboard, content_type="application/json")


def wall_clock() -> str:
    """UTC now, for the page footer."""
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
