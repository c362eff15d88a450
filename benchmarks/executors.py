"""Thread vs process executors, side by side in one run, against the references.

Usage::

    python benchmarks/executors.py                        # ~8 min on 2 cores
    python benchmarks/executors.py --measurement-interval 2000 --skip wide
    # A/B: this checkout against a reference install (e.g. main before a change),
    # tiny_mlp c=32 three times, servers in a rotated order each round:
    python benchmarks/executors.py --skip wide,c1 --rounds 3 --ref-sluice REF/bin/sluice

What it runs (perf_analyzer settings as batching.py; every server on free ports):

* servers: the grpc.aio frontend-only floor (baseline_server.py --frontend-only,
  answers from a cache), the baseline server (grpc.aio + session.run per request),
  ``sluice serve --executor thread`` and ``sluice serve --executor process``;
* tiny_mlp_batched at concurrency 32: throughput and server CPU per inference,
  summed over every process of the server (executor processes included), from
  /proc: this figure does not depend on how busy the machine is;
* tiny_mlp (batching off) at concurrency 1: p50 against the baseline's;
* wide_mlp_batched and wide_mlp (batching off) at concurrency 32: on/off ratio,
  average batch, and compute_infer per batch inside the server (ModelStatistics)
  against onnxruntime in-process at the same batch size and thread count,
  measured by this script just before (ort_ceiling.measure, interpolated).

With ``--ref-sluice`` the same sluice runs also go to a reference install
(servers ``thread-ref`` and ``process-ref``), so a change is measured against
what it changes in one run. With ``--rounds N`` the tiny_mlp c=32 block runs N
times; ratios are per round (each against that round's floor and baseline),
and the tables show their medians.

Writes results/executors-<timestamp>.json and prints markdown tables.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import batching
import build_models
import harness
import ort_ceiling
import request_path

EXECUTORS = ("thread", "process")


def _servers(repo: Path, ref_sluice: str | None) -> dict[str, harness.Server]:
    servers = {
        "frontend": harness.baseline_server(repo / "tiny_mlp", frontend_only=True),
        "baseline": harness.baseline_server(repo / "tiny_mlp"),
    }
    for kind in EXECUTORS:
        servers[kind] = harness.sluice_server(repo, extra=("--executor", kind))
        if ref_sluice:
            servers[f"{kind}-ref"] = harness.sluice_server(
                repo, extra=("--executor", kind), sluice=ref_sluice
            )
    return servers


def _stats(url: str, model: str) -> dict[str, int] | None:
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    client = grpcclient.InferenceServerClient(url)
    try:
        stats = client.get_inference_statistics(model_name=model, as_json=True)
    except InferenceServerException:
        return None
    finally:
        client.close()
    out = {"inferences": 0, "executions": 0, "infer_ns": 0}
    for s in stats.get("model_stats", []):
        out["inferences"] += int(s.get("inference_count", 0))
        out["executions"] += int(s.get("execution_count", 0))
        out["infer_ns"] += int(s.get("inference_stats", {}).get("compute_infer", {}).get("ns", 0))
    return out


def _run(
    server: str,
    url: str,
    pid: int,
    model: str,
    served: str,
    concurrency: int,
    pa_args: argparse.Namespace,
    deadline: float,
    round_: int = 0,
) -> dict[str, Any]:
    run = batching.Run(
        model=model, variant=server, served=served, server=server, concurrency=concurrency
    )
    before = _stats(url, served)
    cpu0, t0 = request_path._cpu_s(pid), time.monotonic()
    batching.perf_analyzer(run, url, pa_args, deadline)
    cpu1, t1 = request_path._cpu_s(pid), time.monotonic()
    after = _stats(url, served)
    served_requests = (run.throughput or 0) * (t1 - t0)
    counted = None
    if before is not None and after is not None:
        # sluice counts what it served over exactly the CPU window; perf_analyzer's
        # rate covers only its measurement windows (the baselines have no counter).
        counted = after["inferences"] - before["inferences"]
        served_requests = counted or served_requests
    row: dict[str, Any] = {
        "server": server,
        "model": served,
        "concurrency": concurrency,
        "round": round_,
        **harness.run_figures(run),
        "server_cpu_us_per_inference": harness.us_per(cpu1 - cpu0, served_requests),
        "counted_inferences": counted,
    }
    if before is not None and after is not None:
        executions = after["executions"] - before["executions"]
        inferences = after["inferences"] - before["inferences"]
        if executions > 0 and inferences > 0:
            row["avg_batch"] = inferences / executions
            # compute_infer is charged to every request of a batch (Triton's
            # statistics), so per request it is the time of that request's batch.
            row["infer_us_per_batch"] = (after["infer_ns"] - before["infer_ns"]) / inferences / 1e3
    print(f"[executors] {row}", file=sys.stderr, flush=True)
    return row


def _find(
    rows: Sequence[dict[str, Any]], server: str, model: str, c: int, round_: int = 0
) -> dict[str, Any]:
    for r in rows:
        if (r["server"], r["model"], r["concurrency"], r.get("round", 0)) == (
            server,
            model,
            c,
            round_,
        ):
            return r
    return {}


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def _median_ratio(
    rows: Sequence[dict[str, Any]], key: str, a: tuple[str, str], b: tuple[str, str], c: int
) -> float | None:
    """Median over rounds of rows[a][key] / rows[b][key], each round against itself."""
    rounds = sorted({r.get("round", 0) for r in rows})
    ratios = [
        q
        for n in rounds
        if (q := _ratio(_find(rows, *a, c, n).get(key), _find(rows, *b, c, n).get(key))) is not None
    ]
    return statistics.median(ratios) if ratios else None


def summary(
    rows: Sequence[dict[str, Any]], ceiling: list[dict[str, float]], kinds: Sequence[str]
) -> list[list[str]]:
    f = harness.fmt
    base_c1 = _find(rows, "baseline", "tiny_mlp", 1)
    table = []
    for kind in kinds:
        tiny = ("tiny_mlp_batched", 32)
        c1 = _find(rows, kind, "tiny_mlp", 1)
        on = _find(rows, kind, "wide_mlp_batched", 32)
        off = _find(rows, kind, "wide_mlp", 32)
        in_proc_ms = None
        if on.get("avg_batch") and ceiling:
            rows_per_s = harness.ceiling_at(ceiling, on["avg_batch"])
            in_proc_ms = 1000 * on["avg_batch"] / rows_per_s if rows_per_s else None
        server_ms = on.get("infer_us_per_batch", 0) / 1000 or None
        p50_gap = (
            c1["p50_us"] - base_c1["p50_us"]
            if c1.get("p50_us") is not None and base_c1.get("p50_us") is not None
            else None
        )
        table.append(
            [
                kind,
                f(
                    _median_ratio(
                        rows, "throughput", (kind, tiny[0]), ("baseline", "tiny_mlp"), 32
                    ),
                    ".2f",
                )
                + "x",
                f(
                    _median_ratio(
                        rows,
                        "server_cpu_us_per_inference",
                        (kind, tiny[0]),
                        ("frontend", "tiny_mlp"),
                        32,
                    ),
                    ".2f",
                )
                + "x",
                f(_ratio(server_ms, in_proc_ms), ".2f") + "x",
                f(_ratio(on.get("throughput"), off.get("throughput")), ".2f") + "x",
                f(p50_gap, "+.0f") + " us",
            ]
        )
    return table


def ab_summary(rows: Sequence[dict[str, Any]]) -> list[list[str]]:
    """This checkout against the reference install, per executor (medians over rounds)."""
    f = harness.fmt
    table = []
    for kind in EXECUTORS:
        new, ref = (kind, "tiny_mlp_batched"), (f"{kind}-ref", "tiny_mlp_batched")
        cpu = _median_ratio(rows, "server_cpu_us_per_inference", new, ref, 32)
        tput = _median_ratio(rows, "throughput", new, ref, 32)
        if cpu is None and tput is None:
            continue
        batch = [
            statistics.median(v)
            if (v := [r["avg_batch"] for r in rows if r["server"] == s and r.get("avg_batch")])
            else None
            for s in (kind, f"{kind}-ref")
        ]
        table.append(
            [
                kind,
                f(cpu, ".3f") + "x",
                f(tput, ".3f") + "x",
                f(batch[0], ".2f") + " / " + f(batch[1], ".2f"),
            ]
        )
    return table


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--measurement-interval", type=int, default=3000, help="ms per window")
    p.add_argument("--repo", type=Path, default=harness.DEFAULT_MODEL_REPO)
    p.add_argument("--no-build", action="store_true", help="use --repo as it is")
    p.add_argument("--skip", default="", help="comma list of parts to skip: tiny, c1, wide")
    p.add_argument("--max-minutes", type=float, default=30)
    p.add_argument(
        "--stability-pct",
        type=int,
        default=batching.STABILITY_PCT,
        help="perf_analyzer -s (raise it on a busy machine: CPU per inference, the figure "
        "that matters here, does not need stable windows)",
    )
    p.add_argument(
        "--ref-sluice",
        help="a `sluice` executable of a reference install: its thread and process "
        "servers run beside this checkout's (A/B in one run)",
    )
    p.add_argument("--rounds", type=int, default=1, help="times to run the tiny_mlp c=32 block")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    skip = set(filter(None, args.skip.split(",")))

    harness.install_cleanup()
    if not args.no_build:
        build_models.build(args.repo)
    pa_args = batching.pa_settings_with_stability(args.measurement_interval, args.stability_pct)
    deadline = time.monotonic() + args.max_minutes * 60
    ceiling: list[dict[str, float]] = []
    if "wide" not in skip:
        sess = ort_ceiling.session(args.repo / "wide_mlp" / "1" / "model.onnx", 1)
        ceiling = [ort_ceiling.measure(sess, b, 2.0) for b in (1, 4, 8, 16, 32)]
        del sess
    kinds = [*EXECUTORS, *(f"{k}-ref" for k in EXECUTORS if args.ref_sluice)]
    # server, base model, served model, c, round
    plan: list[tuple[str, str, str, int, int]] = []
    if "tiny" not in skip:
        tiny = [(s, "tiny_mlp", "tiny_mlp", 32) for s in ("frontend", "baseline")]
        tiny += [(k, "tiny_mlp", "tiny_mlp_batched", 32) for k in kinds]
        for n in range(args.rounds):
            # A rotated order each round: no server always runs first or last.
            shift = n % len(tiny)
            plan += [(*t, n) for t in tiny[shift:] + tiny[:shift]]
    # The reference install is measured on the tiny_mlp block only (the A/B).
    if "c1" not in skip:
        plan += [(s, "tiny_mlp", "tiny_mlp", 1, 0) for s in ("baseline", *EXECUTORS)]
    if "wide" not in skip:
        for k in EXECUTORS:
            plan += [
                (k, "wide_mlp", "wide_mlp_batched", 32, 0),
                (k, "wide_mlp", "wide_mlp", 32, 0),
            ]
    rows: list[dict[str, Any]] = []
    servers = _servers(args.repo, args.ref_sluice)
    try:
        urls = {}
        for name, server in servers.items():
            if any(s == name for s, *_ in plan):
                urls[name] = server.start(timeout_s=180)
        for server_name, model, served, c, round_ in plan:
            proc = servers[server_name].proc
            assert proc is not None
            rows.append(
                _run(
                    server_name,
                    urls[server_name],
                    proc.pid,
                    model,
                    served,
                    c,
                    pa_args,
                    deadline,
                    round_,
                )
            )
    finally:
        for server in servers.values():
            server.stop()
    table = summary(rows, ceiling, kinds)
    headers = [
        "executor",
        "tiny c=32 / baseline",
        "CPU per inference / frontend floor",
        "wide compute per batch / in-process",
        "wide on/off",
        "tiny c=1 p50 - baseline",
    ]
    print(harness.markdown_table(headers, table))
    print()
    ab = ab_summary(rows) if args.ref_sluice else []
    ab_headers = ["executor", "CPU per inference / ref", "infer/s / ref", "avg batch (ref)"]
    if ab:
        print(harness.markdown_table(ab_headers, ab))
        print()
    run_headers = [
        "round",
        "server",
        "model",
        "c",
        "infer/s",
        "p50 us",
        "p99 us",
        "CPU us/inf",
        "avg batch",
    ]
    f = harness.fmt
    print(
        harness.markdown_table(
            run_headers,
            [
                [
                    str(r["round"]),
                    r["server"],
                    r["model"],
                    str(r["concurrency"]),
                    f(r["throughput"], ".0f"),
                    f(r["p50_us"], ".0f"),
                    f(r["p99_us"], ".0f"),
                    f(r["server_cpu_us_per_inference"], ".0f"),
                    f(r.get("avg_batch"), ".2f"),
                ]
                for r in rows
            ],
        )
    )
    out = args.out or harness.BENCH_DIR / "results" / f"executors-{harness.timestamp()}.json"
    result = {
        "kind": "executors",
        "timestamp": harness.timestamp(),
        "command": "python benchmarks/executors.py " + " ".join(argv or sys.argv[1:]),
        "machine": harness.machine_info(),
        "ort_ceiling_wide_mlp": ceiling,
        "runs": rows,
        "summary": {"headers": headers, "rows": table},
        "ab_summary": {"headers": ab_headers, "rows": ab},
    }
    out.write_text(harness.to_json(result))
    print(f"wrote {harness.rel(out)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
