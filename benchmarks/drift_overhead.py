"""What drift monitoring costs: the same model with a drift profile (windows fed
on every batch) vs without one, side by side in one run, under perf_analyzer at
concurrency 32.

Usage::

    python benchmarks/drift_overhead.py [--model tiny_mlp_batched] [--rounds 4]

One server holds two copies of the benchmark model (build_models.py):
``<model>_drift``, profiled with `sluice profile` on 20,000 random rows, and
``<model>`` without a profile. Rounds alternate in ABBA order (drift/plain,
plain/drift, ...) so machine drift and first-or-second effects hit both alike.
/metrics is scraped every --scrape-interval seconds during the whole run, so the
statistics computed at scrape time are counted. Reports the mean throughput of
each and the ratio.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import harness
import numpy as np
from metrics_overhead import http_port, measure_throughput, scrape_forever


def _prepare(repo: Path, model: str) -> tuple[str, str]:
    source = harness.DEFAULT_MODEL_REPO / model
    plain, profiled = model, f"{model}_drift"
    for name in (plain, profiled):
        shutil.copytree(source, repo / name)
        config = repo / name / "config.pbtxt"
        config.write_text(config.read_text().replace(f'name: "{model}"', f'name: "{name}"'))
    dims = int(
        (repo / plain / "config.pbtxt").read_text().split("dims: [", 1)[1].split("]")[0].strip()
    )
    data = repo.parent / "reference.npy"
    np.save(data, np.random.default_rng(0).random((20_000, dims), dtype=np.float32))
    subprocess.run(
        [sys.executable, "-m", "sluice.cli", "--log-level", "WARNING", "profile", profiled, "1",
         "--data", str(data), "--model-repository", str(repo)],
        check=True,
    )  # fmt: skip
    return profiled, plain


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny_mlp_batched")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--measurement-interval", type=int, default=3000)
    parser.add_argument("--scrape-interval", type=float, default=5.0)
    args = parser.parse_args()
    harness.install_cleanup()
    harness.run_bounded(["python", str(harness.BENCH_DIR / "build_models.py")], 120)
    with tempfile.TemporaryDirectory(prefix="sluice-drift-bench-") as tmp:
        repo = Path(tmp) / "repo"
        repo.mkdir()
        profiled, plain = _prepare(repo, args.model)
        with harness.sluice_server(repo) as server:
            url = server.start()
            stop = threading.Event()
            metrics_url = f"http://127.0.0.1:{http_port(server)}/metrics"
            scraper = threading.Thread(
                target=scrape_forever, args=(metrics_url, stop, args.scrape_interval), daemon=True
            )
            scraper.start()
            results: dict[str, list[float]] = {"drift": [], "plain": []}
            try:
                for r in range(args.rounds):
                    pair = [("drift", profiled), ("plain", plain)]
                    for name, model in pair if r % 2 == 0 else pair[::-1]:
                        tput = measure_throughput(
                            url, model, args.concurrency, args.measurement_interval
                        )
                        results[name].append(tput)
                        print(f"round {r + 1} {name}: {tput:.1f} infer/s", flush=True)
                rows = urllib.request.urlopen(metrics_url, timeout=5).read().decode()
            finally:
                stop.set()
    window = [ln for ln in rows.splitlines() if ln.startswith("sluice_drift_window_rows{")]
    on, off = statistics.mean(results["drift"]), statistics.mean(results["plain"])
    summary = {
        "model": args.model,
        "concurrency": args.concurrency,
        "rounds": results,
        "drift_mean": on,
        "plain_mean": off,
        "drift_over_plain": on / off,
        "overhead_pct": 100 * (1 - on / off),
        "window_rows_at_end": window,
        "machine": harness.machine_info(),
        "when": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    out = harness.RESULTS_DIR / f"drift-overhead-{harness.timestamp()}.json"
    out.write_text(harness.to_json(summary))
    print(
        f"drift on {on:.1f} infer/s, off {off:.1f} infer/s: on/off {on / off:.3f} "
        f"(overhead {summary['overhead_pct']:.1f}%); {window}; wrote {out}"
    )


if __name__ == "__main__":
    main()
