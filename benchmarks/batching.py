"""End-to-end dynamic batching benchmark: sluice batching off vs on vs a minimal server.

Usage::

    python benchmarks/batching.py --quick          # ~2 min: tiny_mlp + wide_mlp, c=1,32
    python benchmarks/batching.py                  # all models, c=1,8,32,64, 3 s windows
    python benchmarks/batching.py --models wide_mlp --concurrency 32 --skip-ceiling

One run of this script is one comparison: everything it reports as a ratio was
measured side by side, on the same machine state, by this process:

1. (Re)builds the model repository (build_models.py; deterministic, ~1 s).
2. Unless --skip-ceiling, runs ort_ceiling.py (in-process onnxruntime rows/s at
   batch 1/8/32/64) into results/ort_ceiling.json.
3. Starts ``sluice serve`` on the repository (free ports) and, for tiny_mlp, the
   baseline server (baseline_server.py) and the frontend-only server (the same
   server with --frontend-only: no model run per request, grpc.aio's own limit),
   as subprocesses; waits for their ready lines.
4. For each model and concurrency, runs perf_analyzer back to back against
   ``<model>`` (batching off), ``<model>_batched`` (on), the baseline and frontend-only, reading
   sluice's ModelStatistics before/after each run: average batch size =
   delta inference_count / delta execution_count.
5. Prints markdown tables (every run; the ratios the goals need) and writes
   results/batching-<timestamp>.json (rewritten after every run, so an
   interrupted run keeps what it measured).

perf_analyzer (benchmarks/.venv-perf/bin/pa, see install_perf_analyzer.sh) runs
``-i grpc --concurrency-range C:C --measurement-interval MS --percentile=99``;
when it cannot stabilise it is retried once with ``-s 25`` (25 % instead of 10 %)
stabilising on mean latency instead of p99 (``--no-retry-on-mean`` keeps p99; p99 is
reported either way), and the run is flagged. Every child process is killed by PID
on exit; perf_analyzer runs are cut at the --max-minutes deadline (default 45,
--quick 2.75), so the script ends within a few seconds of it.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import os
import re
import shlex
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import build_models
import harness
import ort_ceiling

DEFAULT_MODELS = ("tiny_mlp", "wide_mlp", "cnn")
DEFAULT_CONCURRENCY = (1, 8, 32, 64)
QUICK_MODELS = ("tiny_mlp", "wide_mlp")
QUICK_CONCURRENCY = (1, 32)
UNSTABLE = "Failed to obtain stable measurement"
GOAL_C = 32  # the concurrency the throughput goals are stated at
LATENCY_SLACK_US = 100  # c=1 goal: p50(on) - p50(off) <= max_queue_delay + 100 us
# perf_analyzer defaults (request_path.py uses the same)
STABILITY_PCT = 10
RETRY_STABILITY_PCT = 25
MAX_TRIALS = 10


@dataclass
class Run:
    model: str  # base model, e.g. wide_mlp
    variant: str  # off | on | baseline | frontend
    served: str  # name perf_analyzer asked for
    server: str  # sluice | baseline | frontend
    concurrency: int
    ok: bool = False
    error: str | None = None
    attempts: int = 0
    stability_pct: int | None = None
    stabilised_on: str = "p99"  # the latency perf_analyzer stabilised on
    throughput: float | None = None  # infer/s (perf_analyzer)
    p50_us: float | None = None
    p90_us: float | None = None
    p99_us: float | None = None
    server_queue_us: float | None = None
    server_compute_us: float | None = None  # input + infer + output
    avg_batch: float | None = None  # sluice statistics delta
    rows: int | None = None
    executions: int | None = None
    wall_s: float = 0.0
    loadavg: list[float] = field(default_factory=list)
    csv_row: dict[str, str] = field(default_factory=dict)


# ----------------------------------------------------------------------------- perf_analyzer


def pa_settings(measurement_interval_ms: int) -> argparse.Namespace:
    """perf_analyzer settings as batching.py's defaults, for the other scripts."""
    return argparse.Namespace(
        stability_pct=STABILITY_PCT,
        retry_stability_pct=RETRY_STABILITY_PCT,
        retry_on_mean=True,
        measurement_interval=measurement_interval_ms,
        max_trials=MAX_TRIALS,
        pa_args="",
    )


def pa_settings_with_stability(
    measurement_interval_ms: int, stability_pct: int
) -> argparse.Namespace:
    """pa_settings with a caller's -s (a busy machine needs a looser one); the
    retry is never stricter than the first attempt."""
    args = pa_settings(measurement_interval_ms)
    args.stability_pct = stability_pct
    args.retry_stability_pct = max(stability_pct, RETRY_STABILITY_PCT)
    return args


def parse_csv(text: str) -> dict[str, str] | None:
    rows = list(csv.DictReader(io.StringIO(text)))
    # perf_analyzer writes one row per concurrency level, then (with server stats)
    # sometimes a blank line and extra sections; the first data row is ours.
    for row in rows:
        if row.get("Concurrency", "").strip().isdigit():
            return {k.strip(): (v or "").strip() for k, v in row.items() if k}
    return None


def _num(row: dict[str, str], key: str) -> float | None:
    try:
        return float(row[key])
    except (KeyError, ValueError):
        return None


def perf_analyzer(
    run: Run,
    url: str,
    args: argparse.Namespace,
    deadline: float,
) -> None:
    pa = harness.perf_analyzer_path()
    # Attempt 1 is the documented setting; attempt 2 loosens the threshold and, with
    # --retry-on-mean, stabilises on mean latency (p99 is still reported).
    attempts = [
        (args.stability_pct, True),
        (args.retry_stability_pct, not args.retry_on_mean),
    ]
    window_s = args.measurement_interval / 1000
    for attempt, (stability, on_p99) in enumerate(attempts, start=1):
        remaining = deadline - time.monotonic()
        if remaining < 3 * window_s + 5:
            run.error = "skipped: --max-minutes budget spent"
            return
        timeout = min(args.max_trials * window_s * 1.5 + 30, remaining)
        with tempfile.TemporaryDirectory(prefix="sluice-pa-") as tmp:
            csv_path = Path(tmp) / "pa.csv"
            argv = [
                str(pa),
                "-i",
                "grpc",
                "-u",
                url,
                "-m",
                run.served,
                "--concurrency-range",
                f"{run.concurrency}:{run.concurrency}",
                "--measurement-interval",
                str(args.measurement_interval),
                *(["--percentile=99"] if on_p99 else []),
                "-s",
                str(stability),
                "-r",
                str(args.max_trials),
                "--verbose-csv",
                "-f",
                str(csv_path),
                *shlex.split(args.pa_args),
            ]
            run.attempts = attempt
            run.stability_pct = stability
            run.stabilised_on = "p99" if on_p99 else "mean"
            rc, out = harness.run_bounded(argv, timeout)
            text = csv_path.read_text() if csv_path.is_file() else ""
        row = parse_csv(text) if rc == 0 else None
        if row is not None:
            run.ok, run.error, run.csv_row = True, None, row
            run.throughput = _num(row, "Inferences/Second")
            run.p50_us = _num(row, "p50 latency")
            run.p90_us = _num(row, "p90 latency")
            run.p99_us = _num(row, "p99 latency")
            run.server_queue_us = _num(row, "Server Queue")
            parts = [
                _num(row, k)
                for k in ("Server Compute Input", "Server Compute Infer", "Server Compute Output")
            ]
            if all(p is not None for p in parts):
                run.server_compute_us = sum(p for p in parts if p is not None)
            return
        tail = " | ".join(line for line in out.strip().splitlines()[-3:])
        run.error = (
            f"perf_analyzer timed out after {timeout:.0f} s"
            if rc is None
            else f"perf_analyzer rc={rc}: {tail}"
        )
        if UNSTABLE not in out:
            return  # a hard failure; a retry with a looser threshold will not help


# ----------------------------------------------------------------------------- reporting


def _by(runs: Sequence[Run], model: str, variant: str, c: int) -> Run | None:
    return next(
        (
            r
            for r in runs
            if r.model == model and r.variant == variant and r.concurrency == c and r.ok
        ),
        None,
    )


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def runs_table(runs: Sequence[Run]) -> str:
    rows = []
    for r in runs:
        note = "" if r.ok else (r.error or "failed")
        if r.ok and r.attempts > 1:
            note = f"retried: -s {r.stability_pct}, stable on {r.stabilised_on}"
        rows.append(
            [
                r.model,
                str(r.concurrency),
                r.variant,
                harness.fmt(r.throughput, ".0f"),
                harness.fmt(r.p50_us, ".0f"),
                harness.fmt(r.p99_us, ".0f"),
                harness.fmt(r.avg_batch, ".2f"),
                harness.fmt(r.server_queue_us, ".0f"),
                harness.fmt(r.server_compute_us, ".0f"),
                note[:70],
            ]
        )
    return harness.markdown_table(
        [
            "model",
            "c",
            "batching",
            "infer/s",
            "p50 us",
            "p99 us",
            "avg batch",
            "srv queue us",
            "srv compute us",
            "note",
        ],
        rows,
        align="lrlrrrrrrl",
    )


def comparison(
    runs: Sequence[Run], models: Sequence[str], conc: Sequence[int], ceiling: dict[str, Any]
) -> list[dict[str, Any]]:
    out = []
    for model in models:
        for c in conc:
            off, on, base, front = (
                _by(runs, model, v, c) for v in ("off", "on", "baseline", "frontend")
            )
            batch = on.avg_batch if on else None
            ceil = (
                harness.ceiling_at(ceiling.get(model, []), batch)
                if batch is not None and ceiling.get(model)
                else None
            )
            out.append(
                {
                    "model": model,
                    "concurrency": c,
                    "off": off.throughput if off else None,
                    "on": on.throughput if on else None,
                    "baseline": base.throughput if base else None,
                    "on_over_off": _ratio(on and on.throughput, off and off.throughput),
                    "on_over_baseline": _ratio(on and on.throughput, base and base.throughput),
                    "frontend": front.throughput if front else None,
                    "on_over_frontend": _ratio(on and on.throughput, front and front.throughput),
                    "frontend_over_baseline": _ratio(
                        front and front.throughput, base and base.throughput
                    ),
                    "avg_batch_on": batch,
                    "ceiling_at_batch": ceil,
                    "on_over_ceiling": _ratio(on and on.throughput, ceil),
                    "p50_off_us": off.p50_us if off else None,
                    "p50_on_us": on.p50_us if on else None,
                    "p50_delta_us": (
                        on.p50_us - off.p50_us
                        if on and off and on.p50_us is not None and off.p50_us is not None
                        else None
                    ),
                }
            )
    return out


def comparison_table(rows: Sequence[dict[str, Any]]) -> str:
    f = harness.fmt
    return harness.markdown_table(
        [
            "model",
            "c",
            "off infer/s",
            "on infer/s",
            "on/off",
            "baseline infer/s",
            "on/baseline",
            "frontend-only infer/s",
            "on/frontend-only",
            "avg batch (on)",
            "ORT ceiling @batch",
            "on/ceiling",
            "p50 on-off us",
        ],
        [
            [
                r["model"],
                str(r["concurrency"]),
                f(r["off"], ".0f", "-"),
                f(r["on"], ".0f", "-"),
                f(r["on_over_off"], ".2f", "-"),
                f(r["baseline"], ".0f", "-"),
                f(r["on_over_baseline"], ".2f", "-"),
                f(r["frontend"], ".0f", "-"),
                f(r["on_over_frontend"], ".2f", "-"),
                f(r["avg_batch_on"], ".2f", "-"),
                f(r["ceiling_at_batch"], ".0f", "-"),
                f(r["on_over_ceiling"], ".2f", "-"),
                f(r["p50_delta_us"], "+.0f", "-"),
            ]
            for r in rows
        ],
    )


def goals(rows: Sequence[dict[str, Any]], delay_us: int) -> list[dict[str, Any]]:
    def get(model: str, c: int) -> dict[str, Any]:
        return next((r for r in rows if r["model"] == model and r["concurrency"] == c), {})

    wide, tiny = get("wide_mlp", GOAL_C), get("tiny_mlp", GOAL_C)
    out: list[dict[str, Any]] = [
        {
            "goal": f"wide_mlp c={GOAL_C}: throughput on / off",
            "value": wide.get("on_over_off"),
            "detail": f"on {harness.fmt(wide.get('on'), '.0f')} / off "
            f"{harness.fmt(wide.get('off'), '.0f')} infer/s",
        },
        {
            "goal": f"wide_mlp c={GOAL_C}: on / ORT ceiling at the avg batch reached",
            "value": wide.get("on_over_ceiling"),
            "detail": f"avg batch {harness.fmt(wide.get('avg_batch_on'), '.2f')}, ceiling "
            f"{harness.fmt(wide.get('ceiling_at_batch'), '.0f')} rows/s",
        },
        {
            "goal": f"tiny_mlp c={GOAL_C}: sluice on / baseline server",
            "value": tiny.get("on_over_baseline"),
            "detail": f"on {harness.fmt(tiny.get('on'), '.0f')} / baseline "
            f"{harness.fmt(tiny.get('baseline'), '.0f')} infer/s; frontend-only "
            f"(no model run) reaches {harness.fmt(tiny.get('frontend_over_baseline'), '.2f')}"
            "x the baseline",
        },
    ]
    bound = delay_us + LATENCY_SLACK_US
    for r in rows:
        if r["concurrency"] == 1:
            delta = r["p50_delta_us"]
            out.append(
                {
                    "goal": f"{r['model']} c=1: p50(on) - p50(off) <= max_queue_delay + "
                    f"{LATENCY_SLACK_US} us = {bound} us",
                    "value": delta,
                    "pass": None if delta is None else delta <= bound,
                    "detail": f"p50 on {harness.fmt(r['p50_on_us'], '.0f')} us, off "
                    f"{harness.fmt(r['p50_off_us'], '.0f')} us",
                }
            )
    return out


def goals_table(items: Sequence[dict[str, Any]]) -> str:
    rows = []
    for g in items:
        value = g["value"]
        is_latency = "p50" in g["goal"]
        shown = harness.fmt(value, "+.0f" if is_latency else ".2f")
        if is_latency and value is not None:
            shown += " us"
        elif value is not None:
            shown += "x"
        verdict = {True: "pass", False: "FAIL", None: ""}[g.get("pass")]
        rows.append([g["goal"], shown, verdict, g["detail"]])
    return harness.markdown_table(["goal", "measured", "", "detail"], rows, align="lrll")


# ----------------------------------------------------------------------------- main


def configured_delay_us(repo: Path, models: Sequence[str]) -> int | None:
    """max_queue_delay_microseconds as the repository's _batched configs state it."""
    for model in models:
        with contextlib.suppress(OSError):
            text = (repo / f"{model}_batched" / "config.pbtxt").read_text()
            m = re.search(r"max_queue_delay_microseconds:\s*(\d+)", text)
            if m:
                return int(m.group(1))
    return None


def load_ceiling(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return dict(data.get("models", {}))


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="tiny_mlp+wide_mlp, c=1,32, 1 s windows")
    p.add_argument("--models", help=f"comma list (default {','.join(DEFAULT_MODELS)})")
    p.add_argument("--concurrency", help="comma list (default 1,8,32,64)")
    p.add_argument("--measurement-interval", type=int, help="ms per window (default 3000)")
    p.add_argument(
        "--max-trials", type=int, help=f"perf_analyzer -r (default {MAX_TRIALS}; quick 6)"
    )
    p.add_argument("--stability-pct", type=int, default=STABILITY_PCT, help="perf_analyzer -s")
    p.add_argument(
        "--retry-stability-pct", type=int, default=RETRY_STABILITY_PCT, help="-s of the one retry"
    )
    p.add_argument(
        "--retry-on-mean",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="the retry stabilises on mean latency instead of p99 (p99 still reported)",
    )
    p.add_argument("--pa-args", default="", help="extra perf_analyzer arguments (one string)")
    p.add_argument("--sluice-only", action="store_true", help="skip the baseline servers")
    p.add_argument(
        "--baseline-models", default="tiny_mlp", help="models also run on the baseline server"
    )
    p.add_argument("--baseline-workers", type=int, default=1)
    p.add_argument("--skip-ceiling", action="store_true", help="reuse results/ort_ceiling.json")
    p.add_argument("--repo", type=Path, default=harness.DEFAULT_MODEL_REPO)
    p.add_argument("--no-build", action="store_true", help="use --repo as it is")
    p.add_argument("--max-queue-delay-us", type=int, default=build_models.DEFAULT_DELAY_US)
    p.add_argument("--intra-op-threads", type=int, default=build_models.DEFAULT_INTRA_OP)
    p.add_argument("--wide-units", type=int, default=build_models.DEFAULT_WIDE_UNITS)
    p.add_argument("--sluice", default="sluice", help="sluice executable")
    p.add_argument("--max-minutes", type=float, help="stop starting runs after this (default 45)")
    p.add_argument("--out", type=Path, help="JSON path (default results/batching-<ts>.json)")
    args = p.parse_args(argv)

    models = [
        m
        for m in (args.models or ",".join(QUICK_MODELS if args.quick else DEFAULT_MODELS)).split(
            ","
        )
        if m
    ]
    unknown = [m for m in models if m not in DEFAULT_MODELS]
    if unknown:
        p.error(f"unknown models {unknown}; choose from {DEFAULT_MODELS}")
    conc_text = args.concurrency or ",".join(
        str(c) for c in (QUICK_CONCURRENCY if args.quick else DEFAULT_CONCURRENCY)
    )
    conc = [int(c) for c in conc_text.split(",") if c]
    if args.measurement_interval is None:
        args.measurement_interval = 1000 if args.quick else 3000
    if args.max_trials is None:
        args.max_trials = 6 if args.quick else MAX_TRIALS
    max_minutes = args.max_minutes or (2.75 if args.quick else 45.0)
    started = time.monotonic()
    deadline = started + 60 * max_minutes
    baseline_models = set() if args.sluice_only else set(args.baseline_models.split(","))
    stamp = harness.timestamp()
    out_path = args.out or harness.RESULTS_DIR / f"batching-{stamp}.json"
    out_path.parent.mkdir(parents=True, exist_ok=True)
    pa = harness.perf_analyzer_path()
    if not os.access(pa, os.X_OK):
        print(f"{pa} missing: run benchmarks/install_perf_analyzer.sh", file=sys.stderr)
        return 2

    harness.install_cleanup()
    if not args.no_build:
        build_models.build(
            args.repo,
            delay_us=args.max_queue_delay_us,
            intra_op_threads=args.intra_op_threads,
            wide_units=args.wide_units,
        )
    delay_us = configured_delay_us(args.repo, models) or args.max_queue_delay_us

    if not args.skip_ceiling:
        print("[batching] in-process ORT ceiling ...", file=sys.stderr, flush=True)
        argv_c = [
            sys.executable,
            str(harness.BENCH_DIR / "ort_ceiling.py"),
            "--repo",
            str(args.repo),
            "--models",
            ",".join(models),
            "--threads",
            str(args.intra_op_threads),
            "--out",
            str(harness.CEILING_JSON),
            *(["--quick"] if args.quick else []),
        ]
        rc, out = harness.run_bounded(argv_c, timeout_s=300)
        if rc != 0:
            print(f"[batching] ort_ceiling failed (rc={rc}):\n{out[-2000:]}", file=sys.stderr)
            return 1
    ceiling = load_ceiling(harness.CEILING_JSON)

    result: dict[str, Any] = {
        "kind": "batching",
        "timestamp": stamp,
        "machine": harness.machine_info(),
        "args": {k: (harness.rel(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "models": models,
        "concurrency": conc,
        "max_queue_delay_us": delay_us,
        "ceiling_source": harness.rel(harness.CEILING_JSON),
        "ceiling_reused": bool(args.skip_ceiling),
        "ceiling": {m: ceiling.get(m) for m in models},
        "runs": [],
    }
    runs: list[Run] = []

    def save() -> None:
        result["runs"] = [asdict(r) for r in runs]
        out_path.write_text(harness.to_json(result), encoding="utf-8")

    sluice = harness.sluice_server(args.repo, sluice=args.sluice)
    baseline: harness.Server | None = None
    frontend: harness.Server | None = None
    try:
        print("[batching] starting sluice ...", file=sys.stderr, flush=True)
        sluice_url = sluice.start(timeout_s=180)
        result["sluice_url"] = sluice_url
        result["sluice_banner"] = list(sluice.lines)[:20]
        print(f"[batching] sluice ready at {sluice_url}", file=sys.stderr, flush=True)
        for model in models:
            variants = [("off", model), ("on", f"{model}_batched")]
            if model in baseline_models:
                baseline = harness.baseline_server(args.repo / model, workers=args.baseline_workers)
                base_url = baseline.start(timeout_s=60)
                print(f"[batching] baseline ready at {base_url}", file=sys.stderr, flush=True)
                variants.append(("baseline", model))
                frontend = harness.baseline_server(args.repo / model, frontend_only=True)
                front_url = frontend.start(timeout_s=60)
                print(f"[batching] frontend-only at {front_url}", file=sys.stderr, flush=True)
                variants.append(("frontend", model))
            for c in conc:
                for variant, served in variants:
                    server = {"baseline": baseline, "frontend": frontend}.get(variant, sluice)
                    assert server is not None
                    run = Run(
                        model=model,
                        variant=variant,
                        served=served,
                        server=server.name,
                        concurrency=c,
                    )
                    runs.append(run)
                    if not server.alive():
                        run.error = f"{server.name} is not running:\n{server.tail(10)}"
                        continue
                    with contextlib.suppress(OSError):
                        run.loadavg = list(os.getloadavg())
                    t0 = time.monotonic()
                    before = harness.model_counts(server.url, served) if server is sluice else None
                    perf_analyzer(run, server.url, args, deadline)
                    after = harness.model_counts(server.url, served) if server is sluice else None
                    run.wall_s = time.monotonic() - t0
                    if before and after:
                        run.rows, run.executions = after[0] - before[0], after[1] - before[1]
                        run.avg_batch = harness.avg_batch(before, after)
                    print(
                        f"[batching] {model} c={c} {variant}: "
                        + (
                            f"{run.throughput:.0f} infer/s, p50 {run.p50_us:.0f} us, "
                            f"p99 {run.p99_us:.0f} us, "
                            f"avg batch {harness.fmt(run.avg_batch, '.2f')}"
                            if run.ok and run.throughput is not None
                            else f"FAILED: {run.error}"
                        )
                        + f" ({run.wall_s:.0f} s)",
                        file=sys.stderr,
                        flush=True,
                    )
                    save()
            for extra in (baseline, frontend):
                if extra is not None:
                    extra.stop()
            baseline = frontend = None
    finally:
        for extra in (baseline, frontend):
            if extra is not None:
                extra.stop()
        sluice.stop()

    rows = comparison(runs, models, conc, ceiling)
    goal_items = goals(rows, delay_us)
    result["comparison"] = rows
    result["goals"] = goal_items
    result["wall_s"] = time.monotonic() - started
    save()

    print(
        f"\n## sluice dynamic batching ({stamp}; {result['machine']['cpu']}, "
        f"{result['machine']['cores']} cores; perf_analyzer on the same machine; "
        f"{args.measurement_interval} ms windows; max_queue_delay {delay_us} us)\n"
    )
    if ceiling:
        print("### In-process onnxruntime ceiling\n")
        print(ort_ceiling.table({"models": {m: ceiling[m] for m in models if m in ceiling}}))
        print()
    print(runs_table(runs))
    print("\n### Side by side\n")
    print(comparison_table(rows))
    print("\n### Goals\n")
    print(goals_table(goal_items))
    if args.skip_ceiling:
        print(f"\n(ceiling reused from {harness.CEILING_JSON}, not measured in this run)")
    print(f"\nwrote {out_path} ({result['wall_s']:.0f} s)")
    return 0 if all(r.ok for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
