"""REST (binary and JSON tensors) against gRPC unary, on one sluice server.

Usage::

    python benchmarks/rest.py                        # tiny_mlp_batched, c=32, ~2 min
    python benchmarks/rest.py --concurrency 8 --measurement-interval 5000

One `sluice serve` on the benchmark repository (benchmarks/build_models.py);
perf_analyzer (same settings as batching.py) runs back to back against it:

* ``grpc``: ``-i grpc`` (ModelInfer, raw tensors);
* ``rest_binary``: ``-i http``, Triton's binary tensor data extension both ways;
* ``rest_json``: ``-i http --input-tensor-format json --output-tensor-format json``.

Each row reports throughput, p50/p99, and the server's CPU time per request
(all its processes, from /proc). The issue's goal: rest_binary >= 0.8x grpc.
Writes results/rest-<ts>.json.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import batching
import build_models
import harness
from request_path import _cpu_s

MODEL = "tiny_mlp_batched"
MODES: dict[str, tuple[str, str]] = {
    # mode -> (protocol, extra perf_analyzer arguments)
    "grpc": ("grpc", ""),
    "rest_binary": ("http", "-i http"),
    "rest_json": ("http", "-i http --input-tensor-format json --output-tensor-format json"),
}
GOAL = 0.8  # rest_binary / grpc throughput


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", default=MODEL)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--measurement-interval", type=int, default=4000, help="ms per window")
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--repo", type=Path, default=harness.DEFAULT_MODEL_REPO)
    p.add_argument("--no-build", action="store_true", help="use --repo as it is")
    args = p.parse_args(argv)

    harness.install_cleanup()
    if not args.no_build:
        build_models.build(args.repo)
    deadline = time.monotonic() + 30 * 60
    rows: list[dict[str, Any]] = []
    server = harness.sluice_server(args.repo)
    try:
        grpc_url = server.start(timeout_s=120)
        http_port = next(
            int(m.group(1))
            for line in server.lines
            if (m := re.search(r"http [\d.]+:(\d+)", line)) is not None
        )
        http_url = f"{grpc_url.rsplit(':', 1)[0]}:{http_port}"
        assert server.proc is not None
        for mode in args.modes.split(","):
            protocol, extra = MODES[mode]
            pa_args = argparse.Namespace(
                stability_pct=batching.STABILITY_PCT,
                retry_stability_pct=batching.RETRY_STABILITY_PCT,
                retry_on_mean=True,
                measurement_interval=args.measurement_interval,
                max_trials=batching.MAX_TRIALS,
                pa_args=extra,  # a later -i overrides batching's "-i grpc"
            )
            run = batching.Run(
                model=args.model,
                variant=mode,
                served=args.model,
                server="sluice",
                concurrency=args.concurrency,
            )
            cpu0, t0 = _cpu_s(server.proc.pid), time.monotonic()
            batching.perf_analyzer(
                run, http_url if protocol == "http" else grpc_url, pa_args, deadline
            )
            cpu1, t1 = _cpu_s(server.proc.pid), time.monotonic()
            served_requests = (run.throughput or 0) * (t1 - t0)
            row = {
                "mode": mode,
                "ok": run.ok,
                "error": run.error,
                "throughput": run.throughput,
                "p50_us": run.p50_us,
                "p99_us": run.p99_us,
                "server_cpu_us_per_request": (
                    1e6 * (cpu1 - cpu0) / served_requests if served_requests else None
                ),
            }
            rows.append(row)
            print(f"[rest] {mode}: {row}", file=sys.stderr, flush=True)
    finally:
        server.stop()

    f = harness.fmt
    grpc_rate = next((r["throughput"] for r in rows if r["mode"] == "grpc"), None)
    print(
        harness.markdown_table(
            ["mode", "infer/s", "vs grpc", "p50 us", "p99 us", "server CPU us/req"],
            [
                [
                    r["mode"],
                    f(r["throughput"], ".0f", "-"),
                    f(
                        r["throughput"] / grpc_rate if grpc_rate and r["throughput"] else None,
                        ".2f",
                        "-",
                    ),
                    f(r["p50_us"], ".0f", "-"),
                    f(r["p99_us"], ".0f", "-"),
                    f(r["server_cpu_us_per_request"], ".0f", "-"),
                ]
                for r in rows
            ],
            align="lrrrrr",
        )
    )
    binary = next((r["throughput"] for r in rows if r["mode"] == "rest_binary"), None)
    if grpc_rate and binary:
        verdict = "met" if binary / grpc_rate >= GOAL else "NOT met"
        print(f"goal rest_binary >= {GOAL}x grpc: {binary / grpc_rate:.2f}x ({verdict})")
    out = harness.RESULTS_DIR / f"rest-{harness.timestamp()}.json"
    out.write_text(
        harness.to_json(
            {
                "machine": harness.machine_info(),
                "model": args.model,
                "concurrency": args.concurrency,
                "measurement_interval_ms": args.measurement_interval,
                "rows": rows,
            }
        ),
        encoding="utf-8",
    )
    print(f"wrote {harness.rel(out)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
