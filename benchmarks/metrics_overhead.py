"""What metrics cost: sluice with metrics on vs `--allow-metrics false`, side by
side in one run, under perf_analyzer at concurrency 32.

Usage::

    python benchmarks/metrics_overhead.py [--model tiny_mlp_batched] [--rounds 3]

Both servers run at once on the benchmark repository (build_models.py); rounds
alternate in ABBA order (on/off, off/on, ...) so drift in the machine's load and
any first-or-second effect hit both alike. While the "on" server is measured, its
/metrics is scraped every --scrape-interval seconds (5 s: three times Prometheus'
usual rate), so the cost of rendering is counted too. Reports the mean throughput
of each and the ratio.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import harness
from batching import parse_csv


def scrape_forever(url: str, stop: threading.Event, interval_s: float) -> None:
    while not stop.wait(interval_s):
        with contextlib.suppress(OSError):  # a failed scrape is the scraper's problem
            urllib.request.urlopen(url, timeout=5).read()


def http_port(server: harness.Server) -> int:
    for line in server.lines:
        if " ready: grpc " in line:
            return int(line.split(", http ")[1].split(" ")[0].rsplit(":", 1)[1])
    raise RuntimeError("no http port in the banner")


def measure_throughput(url: str, model: str, concurrency: int, interval_ms: int) -> float:
    with tempfile.TemporaryDirectory(prefix="sluice-pa-") as tmp:
        csv_path = Path(tmp) / "pa.csv"
        argv = [
            str(harness.perf_analyzer_path()), "-i", "grpc", "-u", url, "-m", model,
            "--concurrency-range", f"{concurrency}:{concurrency}",
            "--measurement-interval", str(interval_ms), "-s", "25", "-r", "10",
            "-f", str(csv_path),
        ]  # fmt: skip
        rc, out = harness.run_bounded(argv, 180)
        row = parse_csv(csv_path.read_text()) if csv_path.is_file() else None
    if rc != 0 or row is None:
        raise RuntimeError(f"perf_analyzer failed (rc={rc}): {out[-500:]}")
    return float(row["Inferences/Second"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny_mlp_batched")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--measurement-interval", type=int, default=3000)
    parser.add_argument("--scrape-interval", type=float, default=5.0)
    parser.add_argument(
        "--off-first", action="store_true", help="start the metrics-off server first"
    )
    args = parser.parse_args()
    harness.install_cleanup()
    harness.run_bounded(["python", str(harness.BENCH_DIR / "build_models.py")], 120)
    repo = harness.DEFAULT_MODEL_REPO
    with (
        harness.sluice_server(repo) as on,
        harness.sluice_server(repo, extra=["--allow-metrics", "false"]) as off,
    ):
        # Start order alternates with --off-first, to rule out a first-started bias.
        if args.off_first:
            off_url, on_url = off.start(), on.start()
        else:
            on_url, off_url = on.start(), off.start()
        metrics_url = f"http://127.0.0.1:{http_port(on)}/metrics"
        results: dict[str, list[float]] = {"on": [], "off": []}
        for r in range(args.rounds):
            pair = [("on", on_url), ("off", off_url)]
            for name, url in pair if r % 2 == 0 else pair[::-1]:
                stop = threading.Event()
                scraper = threading.Thread(
                    target=scrape_forever,
                    args=(metrics_url, stop, args.scrape_interval),
                    daemon=True,
                )
                if name == "on":
                    scraper.start()
                try:
                    tput = measure_throughput(
                        url, args.model, args.concurrency, args.measurement_interval
                    )
                finally:
                    stop.set()
                results[name].append(tput)
                print(f"round {r + 1} metrics {name}: {tput:.1f} infer/s", flush=True)
    on_mean, off_mean = statistics.mean(results["on"]), statistics.mean(results["off"])
    summary = {
        "model": args.model,
        "concurrency": args.concurrency,
        "rounds": results,
        "scrape_interval_s": args.scrape_interval,
        "off_started_first": args.off_first,
        "on_mean": on_mean,
        "off_mean": off_mean,
        "on_over_off": on_mean / off_mean,
        "overhead_pct": 100 * (1 - on_mean / off_mean),
        "machine": harness.machine_info(),
        "when": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    out = harness.RESULTS_DIR / f"metrics-overhead-{harness.timestamp()}.json"
    out.write_text(harness.to_json(summary))
    print(
        f"metrics on {on_mean:.1f} infer/s, off {off_mean:.1f} infer/s: on/off "
        f"{summary['on_over_off']:.3f} (overhead {summary['overhead_pct']:.1f}%); wrote {out}"
    )


if __name__ == "__main__":
    main()
