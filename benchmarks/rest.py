"""REST against gRPC on sluice, and sluice's REST beside KServe's and MLServer's,
on the same ONNX model, in one run.

Usage::

    bash benchmarks/install_perf_analyzer.sh   # perf_analyzer
    bash benchmarks/install_rest_peers.sh      # KServe and MLServer, each in its own venv
    python benchmarks/rest.py                  # tiny_mlp, c=32, ~6 min
    python benchmarks/rest.py --modes grpc,rest_binary --measurement-interval 8000

Servers (each started once, kept up for the whole run; idle ones cost nothing):

* ``sluice``: ``sluice serve`` on the benchmark repository (build_models.py),
  serving ``tiny_mlp_batched`` (dynamic batching, 500 us) and ``tiny_mlp``
  (every request alone);
* ``kserve``: KServe's ModelServer (FastAPI on uvicorn) with a minimal
  ``kserve.Model`` running onnxruntime (peers/kserve_onnx.py);
* ``mlserver``: ``mlserver start`` with a minimal MLServer runtime running
  onnxruntime (peers/mlserver_onnx.py), with ``parallel_workers`` 0 (inference on
  the server's event loop) and, as ``mlserver_w1``, MLServer's default 1
  (inference in a worker process).

Every server runs the same model.onnx with one onnxruntime session of one
intra-op thread; neither peer batches (KServe's Python server has no batcher;
MLServer's adaptive batching is off by default). Per-request log lines are off
everywhere (sluice writes none).

Modes (perf_analyzer, batching.py's settings, concurrency 32, the same input
rows from a data file, --input-data):

* ``grpc``: sluice ModelInfer (raw tensors);
* ``rest_binary``: sluice, ``-i http`` with Triton's binary tensor extension
  both ways; ``kserve_binary``: the same against KServe;
* ``rest_json``: sluice, ``-i http`` with JSON tensors both ways (v2 JSON);
  ``rest_json_unbatched`` the same on ``tiny_mlp``; ``kserve_json``,
  ``mlserver_json``, ``mlserver_w1_json`` the same against the peers.

Each row reports throughput, p50/p99, and the server's CPU time per inference
(all its processes, from /proc), over the whole perf_analyzer run. The issue's
goal: rest_binary >= 0.8x grpc. A mode that fails keeps its error in the
results (kserve_json does: see benchmarks/README.md). Writes
results/rest-<ts>.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import socket
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import batching
import build_models
import harness
import numpy as np
from request_path import _cpu_s

BATCHED, UNBATCHED = "tiny_mlp_batched", "tiny_mlp"
JSON_BOTH = "--input-tensor-format json --output-tensor-format json"
GOAL = 0.8  # rest_binary / grpc throughput
PEERS = harness.BENCH_DIR / "peers"
INPUT_ROWS = 16


@dataclass(frozen=True)
class Mode:
    server: str  # sluice | kserve | mlserver | mlserver_w1
    model: str  # the name perf_analyzer asks for
    protocol: str  # grpc | http
    pa_args: str  # perf_analyzer arguments beyond batching.py's


MODES: dict[str, Mode] = {
    "grpc": Mode("sluice", BATCHED, "grpc", ""),
    "rest_binary": Mode("sluice", BATCHED, "http", "-i http"),
    "rest_json": Mode("sluice", BATCHED, "http", f"-i http {JSON_BOTH}"),
    "rest_json_unbatched": Mode("sluice", UNBATCHED, "http", f"-i http {JSON_BOTH}"),
    "kserve_binary": Mode("kserve", UNBATCHED, "http", "-i http"),
    "kserve_json": Mode("kserve", UNBATCHED, "http", f"-i http {JSON_BOTH}"),
    "mlserver_json": Mode("mlserver", UNBATCHED, "http", f"-i http {JSON_BOTH}"),
    "mlserver_w1_json": Mode("mlserver_w1", UNBATCHED, "http", f"-i http {JSON_BOTH}"),
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _wait_ready(url: str, timeout_s: float, server: harness.Server) -> None:
    """Until GET url answers 200 (the model is loaded), or the server exits."""
    deadline = time.monotonic() + timeout_s
    while True:
        with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=5) as reply:
            if reply.status == 200:
                return
        if not server.alive():
            raise RuntimeError(f"{server.name} exited before it was ready:\n{server.tail()}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{server.name} not ready after {timeout_s:.0f} s:\n{server.tail()}")
        time.sleep(0.5)  # polling a child's readiness over HTTP: nothing to wait on


def _uvicorn_ready(port: int) -> re.Pattern[str]:
    return re.compile(rf"Uvicorn running on http://(?P<host>127\.0\.0\.1):(?P<port>{port})\b")


def kserve_server(venv: Path, onnx: Path, port: int) -> harness.Server:
    argv = [
        str(venv / "bin" / "python"),
        str(PEERS / "kserve_onnx.py"),
        str(onnx),
        "--name",
        UNBATCHED,
        "--port",
        str(port),
        "--max-batch-size",
        str(build_models.MAX_BATCH_SIZE),
        "--intra-op-threads",
        str(build_models.DEFAULT_INTRA_OP),
    ]
    return harness.Server("kserve", argv, _uvicorn_ready(port))


def mlserver_server(venv: Path, onnx: Path, folder: Path, workers: int) -> harness.Server:
    """`mlserver start FOLDER` with settings.json and one model folder written here."""
    port = _free_port()
    folder.mkdir(parents=True, exist_ok=True)
    settings = {
        "debug": False,  # no access log line per request
        "host": "127.0.0.1",
        "http_port": port,
        "grpc_port": _free_port(),
        "metrics_port": _free_port(),
        "parallel_workers": workers,
        "metrics_dir": str(folder / ".metrics"),
        "environments_dir": str(folder / ".envs"),
    }
    (folder / "settings.json").write_text(json.dumps(settings), encoding="utf-8")
    model_dir = folder / UNBATCHED
    model_dir.mkdir(exist_ok=True)
    model_settings = {
        "name": UNBATCHED,
        "implementation": "mlserver_onnx.OnnxRuntime",
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 64]}],
        "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 10]}],
        "parameters": {
            "uri": str(onnx),
            "extra": {
                "max_batch_size": build_models.MAX_BATCH_SIZE,
                "intra_op_threads": build_models.DEFAULT_INTRA_OP,
            },
        },
    }
    (model_dir / "model-settings.json").write_text(json.dumps(model_settings), encoding="utf-8")
    argv = [str(venv / "bin" / "mlserver"), "start", str(folder)]
    env = dict(os.environ, PYTHONPATH=str(PEERS))
    name = "mlserver" if workers == 0 else f"mlserver_w{workers}"
    return harness.Server(name, argv, _uvicorn_ready(port), env=env)


def write_input_data(path: Path) -> Path:
    """INPUT_ROWS rows of x[64], uniform in [-1, 1), seeded: every mode and
    server gets the same values (perf_analyzer's own random data are random
    bit patterns, which in JSON are long numbers and sometimes NaN)."""
    rng = np.random.default_rng(12)
    rows = rng.uniform(-1, 1, size=(INPUT_ROWS, 64)).astype(np.float32)
    data = {"data": [{"x": {"content": [float(v) for v in row], "shape": [64]}} for row in rows]}
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--measurement-interval", type=int, default=4000, help="ms per window")
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--rounds", type=int, default=1, help="passes over the modes, interleaved")
    p.add_argument(
        "--retry-stability-pct",
        type=int,
        default=batching.RETRY_STABILITY_PCT,
        help="perf_analyzer's second attempt (on mean latency) accepts windows this far apart; "
        "recorded per row",
    )
    p.add_argument("--repo", type=Path, default=harness.DEFAULT_MODEL_REPO)
    p.add_argument("--no-build", action="store_true", help="use --repo as it is")
    p.add_argument(
        "--peers-dir", type=Path, default=harness.BENCH_DIR, help="its .venv-kserve, .venv-mlserver"
    )
    args = p.parse_args(argv)
    modes = args.modes.split(",")
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        p.error(f"unknown mode(s) {unknown}; known: {', '.join(MODES)}")

    harness.install_cleanup()
    if not args.no_build:
        build_models.build(args.repo)
    onnx = args.repo / UNBATCHED / "1" / "model.onnx"
    work = Path(tempfile.mkdtemp(prefix="sluice-rest-"))  # input data, MLServer's folders
    input_data = write_input_data(work / "input.json")
    deadline = time.monotonic() + 45 * 60
    needed = {MODES[m].server for m in modes}

    servers: dict[str, harness.Server] = {}
    urls: dict[str, str] = {}
    rows: list[dict[str, Any]] = []
    try:
        if "sluice" in needed:
            s = harness.sluice_server(args.repo)
            grpc_url = s.start(timeout_s=120)
            http_port = next(
                int(m.group(1))
                for line in s.lines
                if (m := re.search(r"http [\d.]+:(\d+)", line)) is not None
            )
            servers["sluice"] = s
            urls["sluice/grpc"] = grpc_url
            urls["sluice"] = f"{grpc_url.rsplit(':', 1)[0]}:{http_port}"
        if "kserve" in needed:
            s = kserve_server(args.peers_dir / ".venv-kserve", onnx, _free_port())
            urls["kserve"] = s.start(timeout_s=180)
            servers["kserve"] = s
        for name, workers in (("mlserver", 0), ("mlserver_w1", 1)):
            if name in needed:
                s = mlserver_server(args.peers_dir / ".venv-mlserver", onnx, work / name, workers)
                urls[name] = s.start(timeout_s=180)
                servers[name] = s
        for name, s in servers.items():
            if name != "sluice":
                _wait_ready(f"http://{urls[name]}/v2/models/{UNBATCHED}/ready", 120, s)

        for round_ in range(args.rounds):
            for mode in modes:
                m = MODES[mode]
                server = servers[m.server]
                assert server.proc is not None
                url = urls[f"{m.server}/grpc"] if m.protocol == "grpc" else urls[m.server]
                pa_args = batching.pa_settings(args.measurement_interval)
                pa_args.retry_stability_pct = args.retry_stability_pct
                # A later -i overrides batching's "-i grpc".
                pa_args.pa_args = f"{m.pa_args} --input-data {input_data}"
                run = batching.Run(
                    model=m.model,
                    variant=mode,
                    served=m.model,
                    server=m.server,
                    concurrency=args.concurrency,
                )
                loadavg = list(os.getloadavg())
                cpu0, t0 = _cpu_s(server.proc.pid), time.monotonic()
                batching.perf_analyzer(run, url, pa_args, deadline)
                cpu1, t1 = _cpu_s(server.proc.pid), time.monotonic()
                # perf_analyzer's warm-up and trials all count: CPU per inference
                # over the whole run, at the measured rate.
                served = (run.throughput or 0) * (t1 - t0)
                row = {
                    "mode": mode,
                    "round": round_,
                    "server": m.server,
                    "model": m.model,
                    "pa_args": m.pa_args,
                    **harness.run_figures(run),
                    "server_cpu_us_per_inference": harness.us_per(cpu1 - cpu0, served),
                    "attempts": run.attempts,
                    "stability_pct": run.stability_pct,
                    "stabilised_on": run.stabilised_on,
                    "loadavg_before": loadavg,
                }
                rows.append(row)
                print(f"[rest] {mode}: {row}", file=sys.stderr, flush=True)
    finally:
        for s in servers.values():
            s.stop()
        shutil.rmtree(work, ignore_errors=True)

    print(table(rows))
    print(verdict(rows))
    out = harness.RESULTS_DIR / f"rest-{harness.timestamp()}.json"
    out.write_text(
        harness.to_json(
            {
                "machine": harness.machine_info(),
                "concurrency": args.concurrency,
                "measurement_interval_ms": args.measurement_interval,
                "input_rows": INPUT_ROWS,
                "peers": peer_versions(args.peers_dir),
                "rows": rows,
            }
        ),
        encoding="utf-8",
    )
    print(f"wrote {harness.rel(out)}", file=sys.stderr)
    return 0


def _mean(values: Sequence[float | None]) -> float | None:
    got = [v for v in values if v is not None]
    return sum(got) / len(got) if got else None


def summary(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One entry per mode (means over rounds that succeeded), in run order."""
    out: list[dict[str, Any]] = []
    for mode in dict.fromkeys(r["mode"] for r in rows):
        mine = [r for r in rows if r["mode"] == mode]
        ok = [r for r in mine if r["ok"]]
        out.append(
            {
                "mode": mode,
                "server": mine[0]["server"],
                "ok": len(ok),
                "runs": len(mine),
                "error": next((r["error"] for r in mine if not r["ok"]), None),
                **{
                    k: _mean([r[k] for r in ok])
                    for k in ("throughput", "p50_us", "p99_us", "server_cpu_us_per_inference")
                },
            }
        )
    return out


def table(rows: Sequence[dict[str, Any]]) -> str:
    """Means over the rounds that succeeded (ok/runs)."""
    f = harness.fmt
    items = summary(rows)
    grpc = next((s["throughput"] for s in items if s["mode"] == "grpc"), None)
    return harness.markdown_table(
        ["mode", "server", "ok/runs", "infer/s", "vs grpc", "p50 us", "p99 us", "CPU us/inf"],
        [
            [
                s["mode"],
                s["server"],
                f"{s['ok']}/{s['runs']}",
                f(s["throughput"], ".0f", "-") if s["ok"] else "failed",
                f(s["throughput"] / grpc if grpc and s["throughput"] else None, ".2f", "-"),
                f(s["p50_us"], ".0f", "-"),
                f(s["p99_us"], ".0f", "-"),
                f(s["server_cpu_us_per_inference"], ".0f", "-"),
            ]
            for s in items
        ],
        align="llrrrrrr",
    )


def verdict(rows: Sequence[dict[str, Any]]) -> str:
    items = {s["mode"]: s for s in summary(rows)}
    lines = []
    grpc = items.get("grpc", {}).get("throughput")
    binary = items.get("rest_binary", {}).get("throughput")
    if grpc and binary:
        ok = "met" if binary / grpc >= GOAL else "NOT met"
        lines.append(f"goal rest_binary >= {GOAL}x grpc: {binary / grpc:.2f}x ({ok})")
    for s in items.values():
        if not s["ok"]:
            lines.append(f"{s['mode']} failed: {s['error']}")
    return "\n".join(lines)


def peer_versions(peers_dir: Path) -> dict[str, str | None]:
    """The versions each peer venv holds (None: not installed)."""
    out: dict[str, str | None] = {}
    for venv, packages in ((".venv-kserve", ("kserve",)), (".venv-mlserver", ("mlserver",))):
        for package in (*packages, "onnxruntime"):
            python = peers_dir / venv / "bin" / "python"
            key = f"{venv.removeprefix('.venv-')}/{package}"
            if not python.exists():
                out[key] = None
                continue
            rc, text = harness.run_bounded(
                [
                    str(python),
                    "-c",
                    f"from importlib.metadata import version; print(version({package!r}))",
                ],
                60,
            )
            out[key] = text.strip() if rc == 0 else None
    return out


if __name__ == "__main__":
    sys.exit(main())
