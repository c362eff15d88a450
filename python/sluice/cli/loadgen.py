"""The load generator behind `sluice bench`: closed-loop load on one model over KServe v2 gRPC.

`concurrency` workers each keep one request in flight (send, await the answer,
send again) on one grpc.aio channel. The request is built once, up front, so the
client spends its time on gRPC rather than numpy. A run is always bounded: by a
request count, a duration, or both (whichever comes first); every request carries
a deadline. The report joins what the client measured (latency, throughput,
errors by status code) with what the server says about the same interval: the
ModelStatistics delta (phase breakdown, batch sizes) and the /metrics delta (cost).
Both deltas include any other client's traffic to the model during the run.
"""

from __future__ import annotations

import asyncio
import bisect
import collections
import contextlib
import dataclasses
import signal
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from typing import Any

import grpc
import numpy as np
from tqdm import tqdm

from sluice import _core, client, datatypes, defaults
from sluice.proto import grpc_service_pb2 as pb
from sluice.proto import grpc_service_pb2_grpc as pb_grpc

DEFAULT_DURATION_S = 10.0
PHASES = ("queue", "compute_input", "compute_infer", "compute_output")
_NS_PER_S = 1_000_000_000
_PROGRESS_REFRESH_S = 0.25
_METRICS_TIMEOUT_S = 5.0
_CONTROL_TIMEOUT_S = 10.0  # metadata, config, statistics: --timeout is for inferences


class BenchError(Exception):
    """A problem that stops the benchmark before it can report anything."""


@dataclasses.dataclass(frozen=True)
class BenchOptions:
    model: str
    url: str = defaults.LOCAL_URL
    version: str = ""
    concurrency: int = 8
    duration_s: float | None = None  # neither this nor `requests`: DEFAULT_DURATION_S
    requests: int | None = None
    batch_size: int = 1
    inputs: Mapping[str, np.ndarray[Any, Any]] = dataclasses.field(default_factory=dict)
    shapes: Mapping[str, tuple[int, ...]] = dataclasses.field(default_factory=dict)
    warmup_requests: int = 20
    metrics_url: str | None = None  # None: derived from `url` (defaults.metrics_url_for)
    timeout_s: float = defaults.CLIENT_TIMEOUT_S  # per request
    progress: bool = True
    tls: client.ClientTls | None = None  # None: plaintext

    def validate(self) -> None:
        for name, value, low in (
            ("--concurrency", self.concurrency, 1),
            ("--batch-size", self.batch_size, 1),
            ("--warmup-requests", self.warmup_requests, 0),
            ("--requests", 1 if self.requests is None else self.requests, 1),
        ):
            if value < low:
                raise BenchError(f"{name} must be >= {low}, got {value}")
        if self.duration_s is not None and not self.duration_s > 0:
            raise BenchError(f"--duration must be > 0, got {self.duration_s}")
        if not self.timeout_s > 0:
            raise BenchError(f"--timeout must be > 0, got {self.timeout_s}")

    @property
    def effective_metrics_url(self) -> str:
        if self.metrics_url is not None:
            return self.metrics_url
        return defaults.metrics_url_for(self.url)


# ---- the request ----------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Workload:
    request: pb.ModelInferRequest
    rows: int  # inferences per request: the batch dimension, or 1 for a model without one
    shapes: dict[str, list[int]]  # input name -> shape sent


def _synthetic(dt: datatypes.DataType, shape: list[int], rng: np.random.Generator) -> Any:
    """Random data of one wire datatype: a numpy array, or a list of bytes for BYTES."""
    arr = datatypes.generated(dt, shape, rng)
    return [str(v).encode() for v in arr.reshape(-1).tolist()] if dt.is_bytes else arr


def _from_file(name: str, dt: datatypes.DataType, arr: np.ndarray[Any, Any]) -> Any:
    if dt.is_bytes:
        if arr.dtype.kind not in ("U", "S", "O"):
            raise BenchError(f"input {name!r} is BYTES; its .npy holds {arr.dtype}, not strings")
        return [v if isinstance(v, bytes) else str(v).encode() for v in arr.reshape(-1).tolist()]
    assert dt.numpy is not None
    return np.ascontiguousarray(arr, dtype=dt.numpy)


def _shape_for(
    t: pb.ModelMetadataResponse.TensorMetadata, max_batch_size: int, options: BenchOptions
) -> list[int]:
    dims = list(t.shape)
    batch = [options.batch_size] if max_batch_size > 0 else []
    rest = dims[1:] if max_batch_size > 0 else dims
    given = options.shapes.get(t.name)
    if given is None:
        return batch + [d if d >= 0 else 1 for d in rest]
    if len(given) != len(rest) or any(d >= 0 and d != g for d, g in zip(rest, given, strict=True)):
        what = "without the batch dimension " if max_batch_size > 0 else ""
        raise BenchError(
            f"--shape {t.name}={','.join(map(str, given))} does not fit the model's shape "
            f"{rest} {what}(-1 = any size)"
        )
    return batch + list(given)


def build_workload(
    meta: pb.ModelMetadataResponse, max_batch_size: int, options: BenchOptions
) -> Workload:
    """The one request every worker sends; synthetic data for inputs not given."""
    if max_batch_size > 0 and options.batch_size > max_batch_size:
        raise BenchError(
            f"--batch-size {options.batch_size} exceeds the model's max_batch_size {max_batch_size}"
        )
    if max_batch_size == 0 and options.batch_size != 1:
        raise BenchError("the model does not batch (max_batch_size 0): --batch-size must be 1")
    known = {t.name for t in meta.inputs}
    for name in [*options.inputs, *options.shapes]:
        if name not in known:
            raise BenchError(f"model {meta.name!r} has no input {name!r} (inputs: {sorted(known)})")
    rng = np.random.default_rng()
    request = pb.ModelInferRequest(model_name=options.model, model_version=options.version)
    shapes: dict[str, list[int]] = {}
    for t in meta.inputs:
        dt = datatypes.BY_WIRE[t.datatype]
        if t.name in options.inputs:
            arr = options.inputs[t.name]
            shape = [int(d) for d in arr.shape]
            data = _from_file(t.name, dt, arr)
        else:
            shape = _shape_for(t, max_batch_size, options)
            data = _synthetic(dt, shape, rng)
        request.inputs.add(name=t.name, datatype=t.datatype, shape=shape)
        raw = _core.encode_bytes_tensor(data) if dt.is_bytes else data.tobytes()
        request.raw_input_contents.append(raw)
        shapes[t.name] = shape
    batch_dims = {s[0] for s in shapes.values() if s}
    if max_batch_size > 0 and len(batch_dims) > 1:
        raise BenchError(f"inputs disagree on the batch dimension: {shapes}")
    rows = batch_dims.pop() if max_batch_size > 0 and batch_dims else 1
    return Workload(request, rows, shapes)


# ---- the load -------------------------------------------------------------------


@dataclasses.dataclass
class LoadResult:
    elapsed_ns: int = 0
    done_ns: list[int] = dataclasses.field(default_factory=list)  # each success, since start
    latency_ns: list[int] = dataclasses.field(default_factory=list)  # same order as done_ns
    errors: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    error_examples: dict[str, str] = dataclasses.field(default_factory=dict)  # code -> details
    interrupted: bool = False
    served_version: str = ""  # the version that answered (the request may leave it to policy)

    @property
    def successes(self) -> int:
        return len(self.latency_ns)

    @property
    def completed(self) -> int:
        return self.successes + sum(self.errors.values())


class _ClosedLoop:
    def __init__(
        self,
        stub: Any,
        request: pb.ModelInferRequest,
        timeout_s: float,
        requests: int | None,
        duration_s: float | None,
    ) -> None:
        self._stub = stub
        self._request = request
        self._timeout_s = timeout_s
        self._limit = requests
        self._duration_ns = None if duration_s is None else int(duration_s * _NS_PER_S)
        self._issued = 0
        self.start_ns = 0
        self.stop = asyncio.Event()
        self.result = LoadResult()

    def _may_send(self) -> bool:
        # The event loop runs one worker at a time, so check-then-increment is safe.
        if self.stop.is_set() or (self._limit is not None and self._issued >= self._limit):
            return False
        if self._duration_ns is not None:
            return time.perf_counter_ns() - self.start_ns < self._duration_ns
        return True

    async def _worker(self) -> None:
        r = self.result
        while self._may_send():
            self._issued += 1
            sent_ns = time.perf_counter_ns()
            try:
                response = await self._stub.ModelInfer(self._request, timeout=self._timeout_s)
            except grpc.aio.AioRpcError as exc:
                code = exc.code().name
                r.errors[code] += 1
                r.error_examples.setdefault(code, exc.details() or "")
                continue
            now_ns = time.perf_counter_ns()
            r.done_ns.append(now_ns - self.start_ns)
            r.latency_ns.append(now_ns - sent_ns)
            r.served_version = response.model_version

    async def run(self, concurrency: int) -> LoadResult:
        self.start_ns = time.perf_counter_ns()
        await asyncio.gather(*(self._worker() for _ in range(concurrency)))
        self.result.elapsed_ns = time.perf_counter_ns() - self.start_ns
        self.result.interrupted = self.stop.is_set()
        return self.result


def _window_stats(load: _ClosedLoop, window_ns: int) -> tuple[float, float, float]:
    """(requests/s, p50 ms, p99 ms) over the last `window_ns` of completions."""
    r = load.result
    now_ns = time.perf_counter_ns() - load.start_ns
    first = bisect.bisect_left(r.done_ns, now_ns - window_ns)  # done_ns only grows
    recent = r.latency_ns[first:]
    if not recent:
        return 0.0, float("nan"), float("nan")
    p50, p99 = np.percentile(np.asarray(recent), [50, 99]) / 1e6
    span_ns = min(window_ns, max(now_ns, 1))
    return len(recent) * _NS_PER_S / span_ns, float(p50), float(p99)


async def _show_progress(
    load: _ClosedLoop, label: str, total: int | None, duration_s: float | None
) -> None:
    if total is not None:
        shape = "{l_bar}{bar}| {n_fmt}/{total_fmt} req [{elapsed}<{remaining}{postfix}]"
    else:
        shape = "{desc}: {n_fmt} req [{elapsed}" + f" of {duration_s or 0:g} s" + "{postfix}]"
    bar = tqdm(
        total=total,
        desc=label,
        file=sys.stderr,
        leave=False,
        bar_format=shape,
    )
    try:
        while True:
            await asyncio.sleep(_PROGRESS_REFRESH_S)
            rate, p50, p99 = _window_stats(load, _NS_PER_S)
            errors = sum(load.result.errors.values())
            bar.set_postfix_str(
                f"last 1 s: {rate:,.0f} req/s, p50 {p50:.2f} ms, p99 {p99:.2f} ms"
                + (f"; {errors} errors" if errors else ""),
                refresh=False,
            )
            bar.update(load.result.completed - bar.n)
    finally:
        bar.close()


async def _run_load(
    stub: Any,
    workload: Workload,
    options: BenchOptions,
    requests: int | None,
    duration_s: float | None,
    measured: bool,
) -> LoadResult:
    """One closed-loop run. `measured`: the real run (progress bar; Ctrl-C ends it
    early and still reports, a second Ctrl-C kills), not the warmup."""
    load = _ClosedLoop(stub, workload.request, options.timeout_s, requests, duration_s)
    loop = asyncio.get_running_loop()
    if measured:
        with contextlib.suppress(NotImplementedError, RuntimeError):  # no signals on Windows
            loop.add_signal_handler(signal.SIGINT, _interrupt, loop, load.stop)
    show_progress = measured and options.progress and sys.stderr.isatty()
    progress = None
    if show_progress:
        label = f"{options.model} x{options.concurrency}"
        progress = asyncio.create_task(_show_progress(load, label, requests, duration_s))
    try:
        return await load.run(min(options.concurrency, requests or options.concurrency))
    finally:
        if progress is not None:
            progress.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await progress
        if measured:
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.remove_signal_handler(signal.SIGINT)


def _interrupt(loop: asyncio.AbstractEventLoop, stop: asyncio.Event) -> None:
    stop.set()
    loop.remove_signal_handler(signal.SIGINT)


# ---- what the server says ---------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ServerCounters:
    """ModelStatistics summed over the versions the request may reach."""

    success: int
    inference_count: int
    execution_count: int
    phase_ns: dict[str, int]

    @classmethod
    def of(cls, response: pb.ModelStatisticsResponse) -> ServerCounters:
        stats = list(response.model_stats)
        return cls(
            success=sum(s.inference_stats.success.count for s in stats),
            inference_count=sum(s.inference_count for s in stats),
            execution_count=sum(s.execution_count for s in stats),
            phase_ns={p: sum(getattr(s.inference_stats, p).ns for s in stats) for p in PHASES},
        )


def server_delta(before: ServerCounters, after: ServerCounters) -> dict[str, Any]:
    requests = after.success - before.success
    executions = after.execution_count - before.execution_count
    inferences = after.inference_count - before.inference_count
    return {
        "requests": requests,
        "inferences": inferences,
        "executions": executions,
        "avg_batch_size": inferences / executions if executions else None,
        "avg_us": {
            p: (after.phase_ns[p] - before.phase_ns[p]) / requests / 1e3 if requests else None
            for p in PHASES
        },
    }


@dataclasses.dataclass(frozen=True)
class CostCounters:
    usd: float
    inferences: float


def _matches(labels: Mapping[str, str], model: str, version: str) -> bool:
    return labels.get("model") == model and (not version or labels.get("version") == version)


def scrape_cost(
    url: str, model: str, version: str, tls: client.ClientTls | None = None
) -> CostCounters:
    """The model's cost and inference counters from a Prometheus /metrics page
    (an https:// page is checked with `tls`'s CA, and given its client certificate)."""
    from prometheus_client.parser import text_string_to_metric_families

    context = tls.ssl_context() if tls is not None and url.startswith("https:") else None
    with urllib.request.urlopen(url, timeout=_METRICS_TIMEOUT_S, context=context) as page:
        text = page.read().decode("utf-8")
    totals = {"sluice_inference_cost_usd_total": 0.0, "nv_inference_count": 0.0}
    seen: set[str] = set()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in totals and _matches(sample.labels, model, version):
                totals[sample.name] += float(sample.value)
                seen.add(sample.name)
    missing = sorted(set(totals) - seen)
    if missing:
        raise LookupError(f"{url} has no {' or '.join(missing)} for model {model!r}")
    return CostCounters(totals["sluice_inference_cost_usd_total"], totals["nv_inference_count"])


# The /metrics page and ModelStatistics are read a few ms apart; traffic in between
# from other clients may make their counts differ by this share, and no more.
COUNT_TOLERANCE = 0.05


def cost_delta(
    before: CostCounters, after: CostCounters, server_inferences: int | None = None
) -> dict[str, Any]:
    """Cost per 1000 inferences over the run. `server_inferences` (the gRPC
    server's ModelStatistics delta) guards against a /metrics page of another
    server: a page whose count disagrees gives no cost, and says why."""
    usd = after.usd - before.usd
    inferences = after.inferences - before.inferences
    per_1k = 1000 * usd / inferences if inferences > 0 else None
    note = None
    if server_inferences is not None and abs(inferences - server_inferences) > max(
        1.0, COUNT_TOLERANCE * server_inferences
    ):
        per_1k = None
        note = (
            f"left out: this page counted {inferences:,.0f} inferences during the run, the "
            f"gRPC server {server_inferences:,}; it is not the same server's "
            "page (check --metrics-url)"
        )
    elif per_1k is None:
        note = "no inferences counted in /metrics during the run"
    elif usd == 0:
        note = "0: the server prices its machine at $0 (start it with --cost-per-hour)"
    return {"usd_per_1000_inferences": per_1k, "usd": usd, "inferences": inferences, "note": note}


async def _try_scrape(
    url: str, model: str, version: str, tls: client.ClientTls | None
) -> CostCounters | str:
    """The counters, or why there are none (the run goes on without cost)."""
    try:
        return await asyncio.to_thread(scrape_cost, url, model, version, tls)
    except (OSError, ValueError, LookupError) as exc:  # URLError is an OSError
        reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
        return f"cost skipped: cannot read {url} ({reason})"


# ---- the whole run --------------------------------------------------------------


def percentiles_ms(latency_ns: list[int]) -> dict[str, float | None]:
    if not latency_ns:
        return dict.fromkeys(("p50", "p90", "p99", "max", "mean"))
    arr = np.asarray(latency_ns, dtype=np.float64) / 1e6
    p50, p90, p99 = np.percentile(arr, [50, 90, 99])
    return {
        "p50": float(p50),
        "p90": float(p90),
        "p99": float(p99),
        "max": float(arr.max()),
        "mean": float(arr.mean()),
    }


@dataclasses.dataclass(frozen=True)
class BenchReport:
    summary: dict[str, Any]  # JSON-ready: what `--json` prints
    load: LoadResult  # raw samples, for plots


async def _call(
    stub: Any, method: str, request: Any, what: str, tls: client.ClientTls | None
) -> Any:
    try:
        return await getattr(stub, method)(request, timeout=_CONTROL_TIMEOUT_S)
    except grpc.aio.AioRpcError as exc:
        details = exc.details() or ""
        hint = client.connection_hint(details, tls)
        raise BenchError(f"{what}: {exc.code().name}: {details}{hint}") from None


def _stop_rule(options: BenchOptions) -> tuple[int | None, float | None]:
    if options.requests is None and options.duration_s is None:
        return None, DEFAULT_DURATION_S
    return options.requests, options.duration_s


async def run_async(options: BenchOptions) -> BenchReport:
    options.validate()
    requests, duration_s = _stop_rule(options)
    metrics_url = options.effective_metrics_url
    channel_options = [
        ("grpc.max_send_message_length", -1),
        ("grpc.max_receive_message_length", -1),
    ]
    async with client.aio_channel(options.url, channel_options, options.tls) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        where = f"model {options.model!r} at {options.url}"
        meta = await _call(
            stub,
            "ModelMetadata",
            pb.ModelMetadataRequest(name=options.model, version=options.version),
            where,
            options.tls,
        )
        config = await _call(
            stub,
            "ModelConfig",
            pb.ModelConfigRequest(name=options.model, version=options.version),
            where,
            options.tls,
        )
        workload = build_workload(meta, config.config.max_batch_size, options)

        warm = LoadResult()
        if options.warmup_requests:
            warm = await _run_load(stub, workload, options, options.warmup_requests, None, False)
            if warm.errors and not warm.successes:
                code, details = next(iter(warm.error_examples.items()))
                raise BenchError(f"every warmup request failed: {code}: {details}")

        stats_request = pb.ModelStatisticsRequest(name=options.model, version=options.version)
        stats_before = await _call(
            stub, "ModelStatistics", stats_request, "statistics", options.tls
        )
        cost_before = await _try_scrape(metrics_url, options.model, options.version, options.tls)
        load = await _run_load(stub, workload, options, requests, duration_s, True)
        # The server may have stopped during the run: what the client measured
        # is still reported, and what could not be read afterwards is named.
        stats_after: pb.ModelStatisticsResponse | str
        try:
            stats_after = await _call(
                stub, "ModelStatistics", stats_request, "statistics", options.tls
            )
        except BenchError as exc:
            stats_after = f"statistics after the run unavailable ({exc})"
        cost_after = await _try_scrape(metrics_url, options.model, options.version, options.tls)

    missing: list[str] = []
    elapsed_s = load.elapsed_ns / _NS_PER_S
    server: dict[str, Any]
    if isinstance(stats_after, str):
        server = {"requests": None, "note": stats_after}
        missing.append("server: " + stats_after)
    else:
        server = server_delta(ServerCounters.of(stats_before), ServerCounters.of(stats_after))
    if isinstance(cost_before, str) or isinstance(cost_after, str):
        note = cost_before if isinstance(cost_before, str) else cost_after
        assert isinstance(note, str)
        cost: dict[str, Any] = {"usd_per_1000_inferences": None, "note": note}
    else:
        cost = cost_delta(cost_before, cost_after, server.get("inferences"))
    if cost["usd_per_1000_inferences"] is None:
        missing.append(f"cost: {cost['note']}")
    summary: dict[str, Any] = {
        "model": options.model,
        "model_version": load.served_version or warm.served_version or options.version,
        "url": options.url,
        "concurrency": options.concurrency,
        "batch_size": workload.rows,
        "input_shapes": workload.shapes,
        "stop": {"requests": requests, "duration_s": duration_s},
        "interrupted": load.interrupted,
        "warmup": {"requests": warm.completed, "successes": warm.successes},
        "requests": load.completed,
        "successes": load.successes,
        "errors": {
            "total": sum(load.errors.values()),
            "by_code": dict(sorted(load.errors.items())),
            "examples": dict(sorted(load.error_examples.items())),
        },
        "elapsed_s": elapsed_s,
        "throughput": {
            "requests_per_s": load.successes / elapsed_s if elapsed_s else 0.0,
            "rows_per_s": load.successes * workload.rows / elapsed_s if elapsed_s else 0.0,
        },
        "latency_ms": percentiles_ms(load.latency_ns),
        "server": server,
        "cost": cost,
        "metrics_url": metrics_url,
        "metrics_url_derived": options.metrics_url is None,
        "missing": missing,
    }
    return BenchReport(summary, load)


def run(options: BenchOptions) -> BenchReport:
    return asyncio.run(run_async(options))


def windows(load: LoadResult, window_s: float = 1.0) -> Iterator[tuple[float, int, list[int]]]:
    """(window mid-time s, window length ns, latencies ns) per window of completions."""
    window_ns = int(window_s * _NS_PER_S)
    # A short tail (the in-flight requests draining after the deadline) joins the
    # window before it: alone, a few completions in a few ms read as a rate spike.
    full, tail_ns = divmod(load.elapsed_ns, window_ns)
    count = max(1, full + (tail_ns * 2 >= window_ns))
    done = np.asarray(load.done_ns, dtype=np.int64)
    latency = np.asarray(load.latency_ns, dtype=np.int64)
    which = np.minimum(done // window_ns, count - 1)
    for w in range(count):
        start_ns = w * window_ns
        end_ns = load.elapsed_ns if w == count - 1 else start_ns + window_ns
        length_ns = max(1, end_ns - start_ns)
        mid_s = (start_ns + length_ns / 2) / _NS_PER_S
        yield mid_s, length_ns, latency[which == w].tolist()
