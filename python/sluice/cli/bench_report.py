"""How `sluice bench` shows a run: the text table, and the optional latency and
throughput plot (matplotlib is an optional dependency: the `plot` extra)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from sluice.cli.loadgen import BenchError, BenchReport, windows

# Throughput has a colour of its own: none of the latency lines' colours.
_COLOURS = {"p50": "tab:blue", "p90": "tab:orange", "p99": "tab:red", "throughput": "tab:green"}
PLOT_MISSING = '--plot needs matplotlib: pip install "sluice-serve[plot]"'


def _num(value: float | None, digits: int = 2) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:,.{digits}f}"


def format_table(s: dict[str, Any]) -> str:
    version = s["model_version"] or "(server's choice)"
    shapes = ", ".join(f"{k} {v}" for k, v in s["input_shapes"].items())
    stop = s["stop"]
    limits = [f"{stop['requests']} requests"] if stop["requests"] else []
    limits += [f"{stop['duration_s']:g} s"] if stop["duration_s"] else []
    lines = [
        f"sluice bench: {s['model']} version {version} at {s['url']}",
        f"  concurrency {s['concurrency']}, batch size {s['batch_size']} ({shapes}), "
        f"stop at {' or '.join(limits)}, warmup {s['warmup']['successes']} ok",
    ]
    if s["interrupted"]:
        lines.append("  interrupted: the numbers cover the run up to Ctrl-C")
    errors = s["errors"]
    by_code = ", ".join(f"{code} {n}" for code, n in errors["by_code"].items())
    lat = s["latency_ms"]
    tput = s["throughput"]
    lines += [
        "",
        f"requests      {s['requests']:,} in {s['elapsed_s']:.2f} s ({s['successes']:,} ok)",
        f"errors        {errors['total']}" + (f" ({by_code})" if by_code else ""),
        *(f"  {code}: {msg}" for code, msg in errors["examples"].items()),
        f"throughput    {_num(tput['requests_per_s'], 1)} requests/s, "
        f"{_num(tput['rows_per_s'], 1)} rows/s (inferences/s)",
        f"latency (ms)  p50 {_num(lat['p50'])}  p90 {_num(lat['p90'])}  "
        f"p99 {_num(lat['p99'])}  max {_num(lat['max'])}",
    ]
    srv = s["server"]
    if srv["requests"] is None:
        lines.append(f"server        - ({srv['note']})")
    elif srv["requests"]:
        avg = srv["avg_us"]
        lines += [
            f"server        {srv['requests']:,} requests (ModelStatistics delta), "
            "average µs per request:",
            f"  queue {_num(avg['queue'], 1)}  compute_input {_num(avg['compute_input'], 1)}  "
            f"compute_infer {_num(avg['compute_infer'], 1)}  "
            f"compute_output {_num(avg['compute_output'], 1)}",
            f"  average batch size {_num(srv['avg_batch_size'])} ({srv['inferences']:,} "
            f"inferences in {srv['executions']:,} executions)",
        ]
    else:
        lines.append("server        no successful requests in ModelStatistics during the run")
    cost = s["cost"]
    per_1k = cost["usd_per_1000_inferences"]
    if per_1k is None:
        lines.append(f"cost          - ({cost['note']})")
    else:
        derived = " (derived from --url)" if s.get("metrics_url_derived") else ""
        lines.append(
            f"cost          ${per_1k:.3g} per 1000 inferences (${cost['usd']:.3g} "
            f"for {cost['inferences']:,.0f} inferences, from {s['metrics_url']}{derived})"
        )
        if cost["note"]:
            lines.append(f"  {cost['note']}")
    if s.get("missing"):
        lines += ["", "missing from this report:", *(f"  {m}" for m in s["missing"])]
    return "\n".join(lines)


def require_matplotlib() -> None:
    """Fails before the run, not after it, when --plot cannot work."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise BenchError(PLOT_MISSING) from None


def plot(report: BenchReport, path: Path) -> None:
    """Latency percentiles and throughput over the run, in 1 s windows."""
    try:
        # The Agg canvas directly: no pyplot global state, no display needed.
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise BenchError(PLOT_MISSING) from None
    mids: list[float] = []
    pct: list[list[float]] = []
    rate: list[float] = []
    for mid_s, length_ns, latency_ns in windows(report.load):
        mids.append(mid_s)
        rate.append(len(latency_ns) * 1e9 / length_ns)
        if latency_ns:
            pct.append([float(v) for v in np.percentile(latency_ns, [50, 90, 99]) / 1e6])
        else:
            pct.append([math.nan] * 3)
    s = report.summary
    fig = Figure(figsize=(9, 6), layout="constrained")
    FigureCanvasAgg(fig)
    top, bottom = fig.subplots(2, 1, sharex=True)
    columns = np.asarray(pct).reshape(-1, 3)
    for i, label in enumerate(("p50", "p90", "p99")):
        top.plot(mids, columns[:, i], marker="o", markersize=3, label=label, color=_COLOURS[label])
    top.set_ylabel("latency (ms)")
    top.set_ylim(bottom=0)
    # Outside the axes, so it never hides the lines it names.
    top.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    top.grid(alpha=0.3)
    bottom.plot(mids, rate, marker="o", markersize=3, color=_COLOURS["throughput"])
    bottom.set_ylabel("throughput (requests/s)")
    bottom.set_xlabel("time since start (s), 1 s windows")
    bottom.set_ylim(bottom=0)
    bottom.grid(alpha=0.3)
    version = s["model_version"] or "(server's choice)"
    fig.suptitle(
        f"sluice bench {s['model']} version {version}: concurrency {s['concurrency']}, "
        f"batch size {s['batch_size']}"
    )
    fig.savefig(path, dpi=100)
