"""Does memory come back after a model unloads? 50 load/unload cycles in explicit
mode, the server's RSS sampled after each unload.

Usage::

    python benchmarks/lifecycle_memory.py [--model wide_mlp] [--cycles 50]

Uses the benchmark repository (build_models.py; wide_mlp holds about 36 MB of
weights, so a leak of one copy per cycle would be plain). Prints RSS after the
first unload, after the last, the maximum, and the growth per cycle from a
least-squares line through the last 40 samples; writes results/lifecycle-memory-<ts>.json.
"""

from __future__ import annotations

import argparse
import time

import harness
import numpy as np
import psutil
import tritonclient.grpc as tc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="wide_mlp")
    parser.add_argument("--cycles", type=int, default=50)
    args = parser.parse_args()
    harness.install_cleanup()
    harness.run_bounded(["python", str(harness.BENCH_DIR / "build_models.py")], 120)
    server = harness.sluice_server(
        harness.DEFAULT_MODEL_REPO, extra=["--model-control-mode", "explicit"]
    )
    with server:
        url = server.start()
        assert server.proc is not None
        proc = psutil.Process(server.proc.pid)
        client = tc.InferenceServerClient(url)
        rss_mb: list[float] = []
        loaded_mb: list[float] = []
        started = time.monotonic()
        for _ in range(args.cycles):
            client.load_model(args.model)
            loaded_mb.append(proc.memory_info().rss / 2**20)
            client.unload_model(args.model)
            rss_mb.append(proc.memory_info().rss / 2**20)
        seconds = time.monotonic() - started
    tail = rss_mb[-40:] if len(rss_mb) >= 40 else rss_mb
    slope = float(np.polyfit(np.arange(len(tail)), tail, 1)[0]) if len(tail) > 1 else 0.0
    summary = {
        "model": args.model,
        "cycles": args.cycles,
        "seconds": seconds,
        "rss_after_unload_mb": rss_mb,
        "rss_loaded_mb": loaded_mb,
        "first_mb": rss_mb[0],
        "last_mb": rss_mb[-1],
        "max_mb": max(rss_mb),
        "growth_mb_per_cycle_last40": slope,
        "machine": harness.machine_info(),
    }
    out = harness.RESULTS_DIR / f"lifecycle-memory-{harness.timestamp()}.json"
    out.write_text(harness.to_json(summary))
    print(
        f"{args.cycles} load/unload cycles of {args.model} in {seconds:.1f} s: RSS after unload "
        f"{rss_mb[0]:.1f} MB first, {rss_mb[-1]:.1f} MB last, {max(rss_mb):.1f} MB max; "
        f"loaded {np.mean(loaded_mb):.1f} MB on average; growth {slope:+.3f} MB/cycle over the "
        f"last {len(tail)}; wrote {out}"
    )


if __name__ == "__main__":
    main()
