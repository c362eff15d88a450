"""`sluice serve --frontends N` and the streaming path, side by side in one run.

Usage::

    python benchmarks/frontends.py                         # ~6 min on 2 cores
    python benchmarks/frontends.py --frontends 1,2,4 --measurement-interval 2000
    python benchmarks/frontends.py --ref-sluice REF/bin/sluice  # + main's rows beside

What it runs (perf_analyzer settings as batching.py; every server on free ports,
one at a time; server CPU summed over every process of the server, frontends
and executors included, from /proc):

* floors: baseline_server.py --frontend-only (grpc.aio answering from a cache)
  unary at concurrency 64 and bidirectional stream (perf_analyzer --streaming)
  at concurrency 32: messages per second and CPU per message;
* the baseline server (grpc.aio + session.run per request), unary c=32;
* sluice with each --frontends N on tiny_mlp_batched: unary at concurrency 64
  (throughput, CPU per inference, average batch) and --streaming at c=32.

For each run it also reports the busiest interpreter: the server process
(frontend, host or executor) whose Python threads used the most CPU per second.
Near 1.0 core that process is bound by its interpreter lock, and its throughput
by 1 / (its Python CPU per inference), however many cores the machine has.

perf_analyzer opens a gRPC channel per few workers, so its load spreads over
the frontends (one HTTP/2 connection is always served by one frontend).

Writes results/frontends-<timestamp>.json and prints markdown tables.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import batching
import build_models
import harness
import request_path

MODEL = "tiny_mlp"
BATCHED = "tiny_mlp_batched"


def _run(
    label: str,
    server: harness.Server,
    served: str,
    concurrency: int,
    streaming: bool,
    pa_args: argparse.Namespace,
    deadline: float,
) -> dict[str, Any]:
    url = server.start(timeout_s=180)
    proc = server.proc
    assert proc is not None
    args = copy.copy(pa_args)
    if streaming:
        args.pa_args = (args.pa_args + " --streaming").strip()
    run = batching.Run(
        model=MODEL, variant=label, served=served, server=label, concurrency=concurrency
    )
    try:
        before = harness.model_counts(url, served)
        cpu0, host0, t0 = request_path._cpu_s(proc.pid), _own_cpu_s(proc.pid), time.monotonic()
        loop0, py0 = _loop_cpu_s(proc.pid), python_threads_cpu_s(proc.pid)
        batching.perf_analyzer(run, url, args, deadline)
        cpu1, host1, t1 = request_path._cpu_s(proc.pid), _own_cpu_s(proc.pid), time.monotonic()
        loop1, py1 = _loop_cpu_s(proc.pid), python_threads_cpu_s(proc.pid)
        after = harness.model_counts(url, served)
    finally:
        server.stop()
    served_requests = (run.throughput or 0) * (t1 - t0)
    row = {
        "server": label,
        "model": served,
        "concurrency": concurrency,
        "streaming": streaming,
        **harness.run_figures(run),
        "server_cpu_us_per_inference": harness.us_per(cpu1 - cpu0, served_requests),
        # The server's main process alone: with --frontends N the host (data
        # plane, batching, thread executors), the rest being its frontends.
        "host_cpu_us_per_inference": harness.us_per(host1 - host0, served_requests),
        # Its main thread alone: the event loop (gRPC with one frontend, data plane).
        "loop_cpu_us_per_inference": harness.us_per(loop1 - loop0, served_requests),
        "avg_batch": harness.avg_batch(before, after),
        # The busiest interpreter: CPU seconds per second of the Python threads of
        # the server process (frontend, host or executor) where they are highest. Near
        # 1.0 that process is bound by its interpreter lock, and throughput by
        # 1 / (its Python CPU per inference), whatever the machine's other cores do.
        **_busiest_interpreter(py0, py1, t1 - t0, served_requests),
    }
    print(f"[frontends] {row}", file=sys.stderr, flush=True)
    return row


def _own_cpu_s(pid: int) -> float:
    import psutil

    try:
        t = psutil.Process(pid).cpu_times()
    except psutil.Error:
        return 0.0
    return t.user + t.system


def _loop_cpu_s(pid: int) -> float:
    """CPU seconds of the process's main thread (the event loop's), from /proc."""
    import psutil

    try:
        threads = psutil.Process(pid).threads()
    except psutil.Error:
        return 0.0
    return next((t.user_time + t.system_time for t in threads if t.id == pid), 0.0)


def python_threads_cpu_s(pid: int) -> dict[int, float]:
    """Per process of the server's tree (frontends, executors): CPU seconds of
    the threads that keep the process's name, which Python's threads do and
    gRPC's own (event_engine, ...) do not. An upper bound of the time the
    process's interpreter lock was held: onnxruntime's intra-op threads keep
    the name too, and a thread executor's worker counts while onnxruntime runs
    without the lock."""
    import psutil

    out: dict[int, float] = {}
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return out
    for p in procs:
        try:
            threads = p.threads()
        except psutil.Error:  # exited meanwhile
            continue
        name = _thread_name(p.pid, p.pid)
        if name is None:
            continue
        out[p.pid] = sum(
            t.user_time + t.system_time for t in threads if _thread_name(p.pid, t.id) == name
        )
    return out


def _thread_name(pid: int, tid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/task/{tid}/comm").read_text()
    except OSError:  # the thread ended meanwhile
        return None


def _busiest_interpreter(
    before: dict[int, float], after: dict[int, float], seconds: float, served: float
) -> dict[str, float | None]:
    used = {pid: cpu - before[pid] for pid, cpu in after.items() if pid in before}
    if not used or seconds <= 0:
        return {"busiest_python_cores": None, "busiest_python_us_per_inference": None}
    top = max(used.values())
    return {
        "busiest_python_cores": top / seconds,
        "busiest_python_us_per_inference": harness.us_per(top, served),
    }


def _find(rows: Sequence[dict[str, Any]], server: str, streaming: bool) -> dict[str, Any]:
    for r in rows:
        if r["server"] == server and r["streaming"] == streaming:
            return r
    return {}


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def summary(rows: Sequence[dict[str, Any]], counts: Sequence[int]) -> list[list[str]]:
    f = harness.fmt
    one = _find(rows, "sluice-f1", False)
    baseline = _find(rows, "baseline", False).get("throughput")
    stream_floor = _find(rows, "frontend", True).get("throughput")
    unary_floor_cpu = _find(rows, "frontend", False).get("server_cpu_us_per_inference")
    table = []
    for n in counts:
        unary = _find(rows, f"sluice-f{n}", False)
        stream = _find(rows, f"sluice-f{n}", True)
        table.append(
            [
                str(n),
                f(unary.get("throughput"), ".0f"),
                f(_ratio(unary.get("throughput"), one.get("throughput")), ".2f") + "x",
                f(unary.get("server_cpu_us_per_inference"), ".0f"),
                f(_ratio(unary.get("server_cpu_us_per_inference"), unary_floor_cpu), ".2f") + "x",
                f(unary.get("avg_batch"), ".2f"),
                f(stream.get("throughput"), ".0f"),
                f(_ratio(stream.get("throughput"), baseline), ".2f") + "x",
                f(_ratio(stream.get("throughput"), stream_floor), ".2f") + "x",
                f(stream.get("server_cpu_us_per_inference"), ".0f"),
            ]
        )
    return table


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--frontends", default="1,2", help="comma list of --frontends values")
    p.add_argument("--measurement-interval", type=int, default=3000, help="ms per window")
    p.add_argument("--concurrency", type=int, default=64, help="unary concurrency")
    p.add_argument("--stream-concurrency", type=int, default=32)
    p.add_argument("--repo", type=Path, default=harness.DEFAULT_MODEL_REPO)
    p.add_argument("--no-build", action="store_true", help="use --repo as it is")
    p.add_argument("--executor", default="thread", choices=("thread", "process"))
    p.add_argument("--max-minutes", type=float, default=30)
    p.add_argument(
        "--stability-pct",
        type=int,
        default=batching.STABILITY_PCT,
        help="perf_analyzer -s (raise it on a busy machine: CPU per inference does not "
        "need stable windows)",
    )
    p.add_argument("--sluice", default="sluice", help="the sluice command to run")
    p.add_argument(
        "--ref-sluice",
        help="a reference sluice command (e.g. an install of main): its one-frontend unary "
        "and stream rows run in the same run, labelled ref-f1",
    )
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    counts = [int(n) for n in args.frontends.split(",") if n]

    harness.install_cleanup()
    if not args.no_build:
        build_models.build(args.repo)
    pa_args = batching.pa_settings_with_stability(args.measurement_interval, args.stability_pct)
    deadline = time.monotonic() + args.max_minutes * 60
    c, sc = args.concurrency, args.stream_concurrency

    def sluice(n: int, command: str = args.sluice) -> Callable[[], harness.Server]:
        extra = ("--executor", args.executor, "--frontends", str(n))
        return lambda: harness.sluice_server(args.repo, extra=extra, sluice=command)

    def floor() -> harness.Server:
        return harness.baseline_server(args.repo / MODEL, frontend_only=True)

    def baseline() -> harness.Server:
        return harness.baseline_server(args.repo / MODEL)

    plan: list[tuple[str, Callable[[], harness.Server], str, int, bool]] = [
        ("frontend", floor, MODEL, c, False),
        ("frontend", floor, MODEL, sc, True),
        ("baseline", baseline, MODEL, sc, False),
    ]
    for n in counts:
        plan += [
            (f"sluice-f{n}", sluice(n), BATCHED, c, False),
            (f"sluice-f{n}", sluice(n), BATCHED, sc, True),
        ]
        if n == 1 and args.ref_sluice:
            plan += [
                ("ref-f1", sluice(1, args.ref_sluice), BATCHED, c, False),
                ("ref-f1", sluice(1, args.ref_sluice), BATCHED, sc, True),
            ]
    rows = [
        _run(label, make(), served, conc, streaming, pa_args, deadline)
        for label, make, served, conc, streaming in plan
    ]
    headers = [
        "frontends",
        f"unary c={c} infer/s",
        "vs 1 frontend",
        "CPU µs/inf",
        "CPU / unary floor",
        "avg batch",
        f"stream c={sc} infer/s",
        "stream / baseline unary",
        "stream / stream floor",
        "stream CPU µs/inf",
    ]
    print(harness.markdown_table(headers, summary(rows, counts)))
    print()
    f = harness.fmt
    print(
        harness.markdown_table(
            [
                "server",
                "c",
                "stream",
                "infer/s",
                "p50 µs",
                "p99 µs",
                "CPU µs/inf",
                "main process µs/inf",
                "loop thread µs/inf",
                "busiest interpreter (cores)",
                "its Python µs/inf",
                "avg batch",
            ],
            [
                [
                    r["server"],
                    str(r["concurrency"]),
                    "yes" if r["streaming"] else "no",
                    f(r["throughput"], ".0f"),
                    f(r["p50_us"], ".0f"),
                    f(r["p99_us"], ".0f"),
                    f(r["server_cpu_us_per_inference"], ".0f"),
                    f(r["host_cpu_us_per_inference"], ".0f"),
                    f(r.get("loop_cpu_us_per_inference"), ".0f"),
                    f(r.get("busiest_python_cores"), ".2f"),
                    f(r.get("busiest_python_us_per_inference"), ".0f"),
                    f(r["avg_batch"], ".2f"),
                ]
                + ([r["error"]] if r["error"] else [])
                for r in rows
            ],
        )
    )
    out = args.out or harness.RESULTS_DIR / f"frontends-{harness.timestamp()}.json"
    out.write_text(
        harness.to_json(
            {
                "machine": harness.machine_info(),
                "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                "rows": rows,
            }
        )
    )
    print(f"\nwrote {harness.rel(out)}")
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
