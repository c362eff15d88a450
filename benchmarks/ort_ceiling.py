"""In-process onnxruntime ceiling: what a serving stack could reach with zero overhead.

Usage: ``python benchmarks/ort_ceiling.py [--repo DIR] [--models tiny_mlp,wide_mlp,cnn]
[--batches 1,8,32,64] [--seconds 2] [--threads 1] [--quick] [--evict-kib N] [--out FILE]``

For each model (read from ``DIR/<model>/1/model.onnx``; the repository is built
with build_models.py defaults when missing) and each batch size, runs
``session.run`` back to back for a fixed duration with the server's session
options (``intra_op_num_threads`` = --threads, ``session.intra_op.allow_spinning``
= "0", graph optimizations on) and reports rows/s, calls/s and the
per-call latency (mean, p50, p99). Prints a markdown table and writes JSON
(default benchmarks/results/ort_ceiling.json) that batching.py interpolates.

``--evict-kib N`` writes N KiB of a scratch buffer between calls (not timed), so
every call starts with the model pushed out of the core's private caches, as in
a server whose frontend runs between batches. Those results go to
``results/ort_ceiling-evict<N>k.json`` unless --out says otherwise, so they never
replace the ceiling batching.py reads.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import harness
import numpy as np
import onnxruntime as ort

DEFAULT_MODELS = ("tiny_mlp", "wide_mlp", "cnn")
DEFAULT_BATCHES = (1, 8, 32, 64)


def session(path: Path, threads: int) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.log_severity_level = 3
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def feeds(sess: ort.InferenceSession, batch: int, seed: int = 0) -> dict[str, np.ndarray[Any, Any]]:
    rng = np.random.default_rng(seed)
    out: dict[str, np.ndarray[Any, Any]] = {}
    for inp in sess.get_inputs():
        shape = [batch, *(d for d in inp.shape[1:])]
        out[inp.name] = rng.standard_normal(shape, dtype=np.float32)
    return out


def measure(
    sess: ort.InferenceSession, batch: int, seconds: float, evict_kib: int = 0
) -> dict[str, float]:
    x = feeds(sess, batch)
    scratch = np.zeros(evict_kib << 10, dtype=np.uint8)
    warm_until = time.perf_counter() + min(0.2, seconds / 4)
    while time.perf_counter() < warm_until:
        sess.run(None, x)
    times: list[float] = []
    start = time.perf_counter()
    end = start + seconds
    now = start
    while now < end:
        if evict_kib:
            scratch += 1
            now = time.perf_counter()
        t0 = now
        sess.run(None, x)
        now = time.perf_counter()
        times.append(now - t0)
    # With eviction, the writes between calls are not the model's cost.
    elapsed = sum(times) if evict_kib else now - start
    times.sort()
    calls = len(times)
    return {
        "batch": batch,
        "calls": calls,
        "seconds": elapsed,
        "rows_per_s": batch * calls / elapsed,
        "calls_per_s": calls / elapsed,
        "mean_ms": 1000.0 * statistics.fmean(times),
        "p50_ms": 1000.0 * times[calls // 2],
        "p99_ms": 1000.0 * times[min(calls - 1, int(calls * 0.99))],
    }


def run(
    repo: Path,
    models: Sequence[str],
    batches: Sequence[int],
    seconds: float,
    threads: int,
    evict_kib: int = 0,
) -> dict[str, Any]:
    result: dict[str, Any] = {
        "kind": "ort_ceiling",
        "timestamp": harness.timestamp(),
        "onnxruntime": ort.__version__,
        "machine": harness.machine_info(),
        "intra_op_threads": threads,
        "allow_spinning": "0",
        "seconds_per_point": seconds,
        "evict_kib": evict_kib,
        "repo": harness.rel(repo),
        "models": {},
    }
    for model in models:
        path = repo / model / "1" / "model.onnx"
        sess = session(path, threads)
        points = []
        for batch in batches:
            p = measure(sess, batch, seconds, evict_kib)
            points.append(p)
            print(
                f"  {model} b={batch}: {p['rows_per_s']:.0f} rows/s, {p['mean_ms']:.3f} ms/call",
                file=sys.stderr,
                flush=True,
            )
        result["models"][model] = points
        del sess
    return result


def table(result: dict[str, Any]) -> str:
    rows = []
    for model, points in result["models"].items():
        base = points[0]["rows_per_s"] if points and points[0]["batch"] == 1 else None
        for p in points:
            rows.append(
                [
                    model,
                    str(p["batch"]),
                    f"{p['rows_per_s']:.0f}",
                    f"{p['calls_per_s']:.0f}",
                    f"{p['mean_ms']:.3f}",
                    f"{p['p50_ms']:.3f}",
                    f"{p['p99_ms']:.3f}",
                    harness.fmt(p["rows_per_s"] / base if base else None, ".2f") + "x",
                ]
            )
    return harness.markdown_table(
        ["model", "batch", "rows/s", "calls/s", "mean ms", "p50 ms", "p99 ms", "rows/s vs b1"],
        rows,
    )


def ensure_repo(repo: Path) -> None:
    if not all((repo / m / "1" / "model.onnx").is_file() for m in DEFAULT_MODELS):
        import build_models

        print(f"building the benchmark repository in {repo}", file=sys.stderr)
        build_models.build(repo)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repo", type=Path, default=harness.DEFAULT_MODEL_REPO)
    parser.add_argument("--models", default=",".join(DEFAULT_MODELS))
    parser.add_argument("--batches", default=",".join(str(b) for b in DEFAULT_BATCHES))
    parser.add_argument("--seconds", type=float, default=2.0, help="duration per point")
    parser.add_argument("--threads", type=int, default=1, help="intra_op_num_threads")
    parser.add_argument("--quick", action="store_true", help="0.5 s per point")
    parser.add_argument(
        "--evict-kib", type=int, default=0, help="KiB written between calls (cold caches)"
    )
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    models = [m for m in args.models.split(",") if m]
    batches = [int(b) for b in args.batches.split(",") if b]
    seconds = 0.5 if args.quick else args.seconds
    ensure_repo(args.repo)
    result = run(args.repo, models, batches, seconds, args.threads, args.evict_kib)
    out = args.out or (
        harness.RESULTS_DIR / f"ort_ceiling-evict{args.evict_kib}k.json"
        if args.evict_kib
        else harness.CEILING_JSON
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(harness.to_json(result), encoding="utf-8")
    print(
        f"\nonnxruntime {result['onnxruntime']}, intra_op_num_threads={args.threads}, "
        f"{seconds:g} s per point, {args.evict_kib} KiB evicted between calls, "
        f"{result['machine']['cpu']} "
        f"({result['machine']['cores']} cores)\n"
    )
    print(table(result))
    print(f"\nwrote {harness.rel(out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
