"""What the status page costs the server with 50 models loaded.

Usage::

    python benchmarks/status_page.py                  # 50 models, 100 renders, ~4 min
    python benchmarks/status_page.py --models 50 --renders 100 --canary-every 5

Builds a repository of `--models` small models (x[N,8] @ W -> y[N,4], dynamic
batching), each with a drift profile (computed once with `sluice profile`, copied
to the others: same signature), and every `--canary-every`-th with a second
version as a canary at weight 0.2; starts one `sluice serve` on it with a price
(`--cost-per-hour 1`), and sends every model traffic for `--warmup-s` seconds
so the page has rates, latencies, batch sizes and full drift windows to show.

Then, with the traffic stopped:

* idle: the server's CPU over `--idle-s` seconds (the page's sampling timer
  and everything else an idle server does);
* renders: `--renders` GETs of /status, `--interval-s` apart (longer than the
  page's 1 s reuse, so each one is a fresh render). Per render: what the page's
  footer reports (the render on its thread: wall time and thread CPU; the time
  spent reading the host on the event loop, and its longest slice), the
  client's end-to-end time, and the server's CPU per render: its CPU over the
  run less the idle rate over the same time, / renders (all its processes,
  /proc, 10 ms ticks: meaningful over many renders only).

Writes results/status-page-<ts>.json.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import harness
import numpy as np
import onnx
from onnx import TensorProto, helper
from request_path import _cpu_s

FEATURES = 8
CONFIG = f"""max_batch_size: 8
input [ {{ name: "x" data_type: TYPE_FP32 dims: [ {FEATURES} ] }} ]
output [ {{ name: "y" data_type: TYPE_FP32 dims: [ 4 ] }} ]
dynamic_batching {{ }}
version_policy: {{ all: {{}} }}
"""
FOOTER = re.compile(
    r"in (?P<total>[\d.]+) ms \((?P<cpu>[\d.]+) ms CPU on the render thread; on the event "
    r"loop (?P<loop>[\d.]+) ms \((?P<loop_cpu>[\d.]+) ms CPU\), at most (?P<slice>[\d.]+) ms "
    r"at a time\)"
)


def _model(path: Path, seed: int) -> None:
    rng = np.random.default_rng(seed)
    w = helper.make_tensor(
        "w", TensorProto.FLOAT, [FEATURES, 4], rng.standard_normal(FEATURES * 4).astype(np.float32)
    )
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "small",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", FEATURES])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
        [w],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))


def build_repository(root: Path, models: int, canary_every: int, sluice: str) -> list[str]:
    names = [f"m{i:03d}" for i in range(models)]
    for i, name in enumerate(names):
        d = root / name
        _model(d / "1" / "model.onnx", i)
        (d / "config.pbtxt").write_text(CONFIG)
        if canary_every and i % canary_every == 0:
            _model(d / "2" / "model.onnx", 1000 + i)
            labels = {"stable": 1, "canary": {"version": 2, "weight": 0.2}}
            (d / "labels.json").write_text(json.dumps(labels))
    data = root.parent / "profile.npy"
    np.save(data, np.random.default_rng(0).standard_normal((2000, FEATURES)).astype(np.float32))
    rc, out = harness.run_bounded(
        [sluice, "profile", names[0], "1", "--data", str(data), "--model-repository", str(root)],
        300,
    )
    if rc != 0:
        raise RuntimeError(f"sluice profile failed: {out[-1000:]}")
    profile = [p for p in (root / names[0] / "1").iterdir() if p.name.startswith("drift_profile")]
    for name in names:
        for version_dir in (root / name).iterdir():
            if version_dir.is_dir() and version_dir != root / names[0] / "1":
                for p in profile:
                    (version_dir / p.name).write_bytes(p.read_bytes())
    return names


def traffic(url: str, names: Sequence[str], stop: threading.Event, threads: int) -> int:
    import tritonclient.grpc as tc

    sent = [0] * threads

    def run(k: int) -> None:
        client = tc.InferenceServerClient(url)
        x = np.random.default_rng(k).standard_normal((2, FEATURES)).astype(np.float32)
        i = k
        while not stop.is_set():
            inp = tc.InferInput("x", [2, FEATURES], "FP32")
            inp.set_data_from_numpy(x)
            client.infer(names[i % len(names)], [inp])
            sent[k] += 1
            i += threads
        client.close()

    workers = [threading.Thread(target=run, args=(k,), daemon=True) for k in range(threads)]
    for w in workers:
        w.start()
    stop.wait()
    for w in workers:
        w.join(timeout=30)
    return sum(sent)


def percentile(values: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--models", type=int, default=50)
    p.add_argument("--canary-every", type=int, default=5, help="0: no canaries")
    p.add_argument("--renders", type=int, default=100)
    p.add_argument("--interval-s", type=float, default=1.1)
    p.add_argument("--idle-s", type=float, default=30.0)
    p.add_argument("--warmup-s", type=float, default=20.0)
    p.add_argument("--client-threads", type=int, default=4)
    args = p.parse_args(argv)
    harness.install_cleanup()
    sluice = str(Path(sys.executable).parent / "sluice")

    with tempfile.TemporaryDirectory(prefix="sluice-status-bench-") as tmp:
        repo = Path(tmp) / "repo"
        names = build_repository(repo, args.models, args.canary_every, sluice)
        server = harness.sluice_server(repo, extra=["--cost-per-hour", "1"], sluice=sluice)
        with server:
            url = server.start(timeout_s=600)
            assert server.proc is not None
            pid = server.proc.pid
            http = int(
                next(ln for ln in server.lines if " ready: grpc " in ln)
                .split(", http ")[1]
                .split(" ")[0]
                .rsplit(":", 1)[1]
            )
            page_url = f"http://127.0.0.1:{http}/status"

            stop = threading.Event()
            sent: list[int] = []
            loader = threading.Thread(
                target=lambda: sent.append(traffic(url, names, stop, args.client_threads))
            )
            loader.start()
            time.sleep(args.warmup_s)  # a benchmark phase, not a test wait
            stop.set()
            loader.join()

            cpu0, t0 = _cpu_s(pid), time.monotonic()
            time.sleep(args.idle_s)
            idle_cpu_per_s = (_cpu_s(pid) - cpu0) / (time.monotonic() - t0)

            totals, cpus, loops, loop_cpus, slices, clients, sizes = [], [], [], [], [], [], []
            cpu0, t0 = _cpu_s(pid), time.monotonic()
            for _ in range(args.renders):
                started = time.perf_counter()
                with urllib.request.urlopen(page_url, timeout=30) as response:
                    body = response.read().decode()
                clients.append((time.perf_counter() - started) * 1e3)
                m = FOOTER.search(body)
                if m is None:
                    raise RuntimeError("no render time in the page footer")
                totals.append(float(m["total"]))
                cpus.append(float(m["cpu"]))
                loops.append(float(m["loop"]))
                slices.append(float(m["slice"]))
                loop_cpus.append(float(m["loop_cpu"]))
                sizes.append(len(body))
                time.sleep(args.interval_s)  # past the page's 1 s reuse: a fresh render
            elapsed_s = time.monotonic() - t0
            busy_cpu_s = _cpu_s(pid) - cpu0
        rows = body.count("<tr>")
    per_render_ms = (busy_cpu_s - idle_cpu_per_s * elapsed_s) / args.renders * 1e3

    def summary(values: Sequence[float]) -> dict[str, float]:
        return {
            "median": statistics.median(values),
            "p99": percentile(values, 99),
            "max": max(values),
        }

    result: dict[str, Any] = {
        "models": args.models,
        "versions_with_canary": len(range(0, args.models, args.canary_every))
        if args.canary_every
        else 0,
        "renders": args.renders,
        "requests_sent_in_warmup": sent[0] if sent else 0,
        "page_bytes": statistics.median(sizes),
        "table_rows": rows,
        "render_ms": summary(totals),
        "render_thread_cpu_ms": summary(cpus),
        "event_loop_ms": summary(loops),
        "event_loop_cpu_ms": summary(loop_cpus),
        "event_loop_longest_slice_ms": summary(slices),
        "client_ms": summary(clients),
        "server_cpu_per_render_ms": per_render_ms,
        "idle_server_cpu_pct": 100 * idle_cpu_per_s,
        "machine": harness.machine_info(),
        "when": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    out = harness.RESULTS_DIR / f"status-page-{harness.timestamp()}.json"
    out.write_text(harness.to_json(result))
    print(json.dumps({k: v for k, v in result.items() if k != "machine"}, indent=2))
    print(f"wrote {harness.rel(out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
