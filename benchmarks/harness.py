"""Shared plumbing for the benchmark scripts: paths, child processes, statistics.

Every child process (servers, perf_analyzer, helper scripts) is started in its own
session and registered here; it is killed by PID (its process group, whose id is
its PID) when the script ends, whether normally, by an exception, by SIGINT or by
SIGTERM.
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import itertools
import json
import os
import platform
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
DEFAULT_MODEL_REPO = BENCH_DIR / ".repo"
RESULTS_DIR = BENCH_DIR / "results"
CEILING_JSON = RESULTS_DIR / "ort_ceiling.json"

# sluice prints "sluice X ready: grpc HOST:PORT, http ..." once every model is loaded.
SLUICE_READY = re.compile(r"ready: grpc (?P<host>[0-9A-Za-z.\-\[\]:]+?):(?P<port>\d+)\b")
# benchmarks/baseline_server.py prints "baseline ready: grpc HOST:PORT model NAME".
BASELINE_READY = SLUICE_READY

_LIVE: dict[int, subprocess.Popen[Any]] = {}
_LIVE_LOCK = threading.Lock()


def rel(path: Path) -> str:
    """A path as recorded in results: relative to the repository when inside it."""
    try:
        return str(Path(path).resolve().relative_to(REPO_ROOT))
    except ValueError:
        return str(path)


def to_json(data: object) -> str:
    """Results as JSON with this checkout's absolute path taken out (server logs
    quote it), so committed results name no path of the machine that made them."""
    return json.dumps(data, indent=2).replace(str(REPO_ROOT) + "/", "") + "\n"


def timestamp() -> str:
    return time.strftime("%Y%m%d-%H%M%S")


def perf_analyzer_path() -> Path:
    venv = Path(os.environ.get("PERF_ANALYZER_VENV", "benchmarks/.venv-perf"))
    if not venv.is_absolute():
        venv = REPO_ROOT / venv
    return venv / "bin" / "pa"


def machine_info() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    info: dict[str, Any] = {
        "cpu": cpu,
        "cores": cores,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    with contextlib.suppress(OSError):
        info["loadavg_at_start"] = os.getloadavg()
    return info


# --------------------------------------------------------------------------- processes


def _register(proc: subprocess.Popen[Any]) -> None:
    with _LIVE_LOCK:
        _LIVE[proc.pid] = proc


def _unregister(proc: subprocess.Popen[Any]) -> None:
    with _LIVE_LOCK:
        _LIVE.pop(proc.pid, None)


def kill_tree(proc: subprocess.Popen[Any], grace_s: float = 5.0) -> None:
    """SIGTERM the child's process group (pgid == its PID), SIGKILL after grace_s."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5.0)
    _unregister(proc)


def _kill_all() -> None:
    with _LIVE_LOCK:
        procs = list(_LIVE.values())
    for proc in procs:
        kill_tree(proc, grace_s=2.0)


def _on_signal(signum: int, _frame: Any) -> None:
    # Unwind through finally blocks (which stop the servers); atexit is the backstop.
    raise SystemExit(128 + signum)


def install_cleanup() -> None:
    """Kill every registered child on exit, SIGTERM and SIGHUP (SIGINT raises anyway)."""
    atexit.register(_kill_all)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        with contextlib.suppress(ValueError, OSError):
            signal.signal(sig, _on_signal)


def popen(
    argv: Sequence[str], *, env: Mapping[str, str] | None = None, **kwargs: Any
) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        list(argv),
        env=dict(env) if env is not None else None,
        start_new_session=True,
        text=True,
        **kwargs,
    )
    _register(proc)
    return proc


def run_bounded(
    argv: Sequence[str], timeout_s: float, *, env: Mapping[str, str] | None = None
) -> tuple[int | None, str]:
    """Run argv with stdout+stderr captured; kill it after timeout_s.

    Returns (exit code or None on timeout, combined output).
    """
    proc = popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        out, _ = proc.communicate(timeout=timeout_s)
        rc: int | None = proc.returncode
    except subprocess.TimeoutExpired:
        kill_tree(proc, grace_s=1.0)
        out, _ = proc.communicate()
        rc = None
    finally:
        kill_tree(proc, grace_s=1.0)
    return rc, out or ""


class Server:
    """A server subprocess that announces readiness with a line on stdout/stderr."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        ready: re.Pattern[str],
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.ready_re = ready
        self.env = env
        self.proc: subprocess.Popen[str] | None = None
        self.lines: collections.deque[str] = collections.deque(maxlen=200)
        self.url = ""
        self._ready = threading.Event()
        self._reader: threading.Thread | None = None

    def _drain(self) -> None:
        assert self.proc is not None
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))
            if not self._ready.is_set():
                m = self.ready_re.search(line)
                if m:
                    self.url = f"{m.group('host')}:{m.group('port')}"
                    self._ready.set()

    def start(self, timeout_s: float = 120.0) -> str:
        env = dict(os.environ if self.env is None else self.env)
        env.setdefault("PYTHONUNBUFFERED", "1")
        self.proc = popen(
            self.argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, bufsize=1
        )
        self._reader = threading.Thread(target=self._drain, name=f"{self.name}-out", daemon=True)
        self._reader.start()
        deadline = time.monotonic() + timeout_s
        while not self._ready.wait(0.1):
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"{self.name} exited with {self.proc.returncode} before it was ready:\n"
                    + self.tail()
                )
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{self.name} not ready after {timeout_s:.0f} s:\n{self.tail()}")
        return self.url

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def tail(self, n: int = 40) -> str:
        return "\n".join(list(self.lines)[-n:])

    def stop(self) -> None:
        if self.proc is not None:
            kill_tree(self.proc, grace_s=10.0)
            if self._reader is not None:
                self._reader.join(timeout=2.0)

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def sluice_server(
    repo: Path, *, extra: Sequence[str] = (), grace_s: float = 2.0, sluice: str = "sluice"
) -> Server:
    argv = [
        sluice,
        "serve",
        "--model-repository",
        str(repo),
        "--grpc-port",
        "0",
        "--http-port",
        "0",
        "--grace-seconds",
        str(grace_s),
        *extra,
    ]
    return Server("sluice", argv, SLUICE_READY)


def baseline_server(model_dir: Path, *, workers: int = 1, frontend_only: bool = False) -> Server:
    """baseline_server.py on a free port; `frontend_only` makes it answer from a
    cache of outputs (grpc.aio's own limit), named "frontend"."""
    argv = [
        sys.executable,
        str(BENCH_DIR / "baseline_server.py"),
        str(model_dir),
        "--port",
        "0",
        "--workers",
        str(workers),
    ]
    if frontend_only:
        argv.append("--frontend-only")
    return Server("frontend" if frontend_only else "baseline", argv, BASELINE_READY)


# --------------------------------------------------------------------------- statistics


def model_counts(url: str, model: str, timeout_s: float = 10.0) -> tuple[int, int] | None:
    """(inference_count, execution_count) summed over versions, or None when the
    server has no statistics (e.g. the baseline server)."""
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    client = grpcclient.InferenceServerClient(url)
    try:
        stats = client.get_inference_statistics(model_name=model, client_timeout=timeout_s)
    except InferenceServerException:
        return None
    finally:
        client.close()
    rows = sum(int(s.inference_count) for s in stats.model_stats)
    batches = sum(int(s.execution_count) for s in stats.model_stats)
    return rows, batches


def run_figures(run: Any) -> dict[str, Any]:
    """The perf_analyzer figures every benchmark row records (a batching.Run)."""
    return {
        "ok": run.ok,
        "error": run.error,
        "throughput": run.throughput,
        "p50_us": run.p50_us,
        "p99_us": run.p99_us,
    }


def us_per(seconds: float, count: float) -> float | None:
    """Microseconds per item (CPU per inference); None when nothing was counted."""
    return 1e6 * seconds / count if count else None


def avg_batch(before: tuple[int, int] | None, after: tuple[int, int] | None) -> float | None:
    if before is None or after is None:
        return None
    rows, batches = after[0] - before[0], after[1] - before[1]
    return rows / batches if batches > 0 else None


# --------------------------------------------------------------------------- ceiling


def ceiling_at(points: Sequence[Mapping[str, float]], batch: float) -> float | None:
    """In-process rows/s at a (fractional) batch size.

    Per-call latency is close to affine in the batch size, so it is interpolated
    linearly between the measured batch sizes (and extrapolated from the two
    nearest outside them); rows/s = batch / latency.
    """
    pts = sorted((float(p["batch"]), float(p["mean_ms"])) for p in points if p.get("mean_ms"))
    if not pts or batch <= 0:
        return None
    if len(pts) == 1:
        b, ms = pts[0]
        return 1000.0 * batch / (ms * batch / b)
    if batch <= pts[0][0]:
        lo, hi = pts[0], pts[1]
    elif batch >= pts[-1][0]:
        lo, hi = pts[-2], pts[-1]
    else:
        lo, hi = next((a, b) for a, b in itertools.pairwise(pts) if a[0] <= batch <= b[0])
    slope = (hi[1] - lo[1]) / (hi[0] - lo[0])
    ms = max(1e-6, lo[1] + slope * (batch - lo[0]))
    return 1000.0 * batch / ms


def fmt(value: float | None, spec: str = ".1f", none: str = "n/a") -> str:
    return none if value is None else format(value, spec)


def markdown_table(
    headers: Sequence[str], rows: Sequence[Sequence[str]], align: str | None = None
) -> str:
    """align: one 'l' or 'r' per column (default: first column left, the rest right)."""
    align = align or "l" + "r" * (len(headers) - 1)
    widths = [len(h) for h in headers]
    for row in rows:
        widths = [max(w, len(c)) for w, c in zip(widths, row, strict=True)]

    def cells(row: Sequence[str]) -> str:
        return " | ".join(
            c.ljust(w) if a == "l" else c.rjust(w)
            for c, w, a in zip(row, widths, align, strict=True)
        )

    sep = "|" + "|".join(
        "-" * (w + 1) + (":" if a == "r" else "-") for w, a in zip(widths, align, strict=True)
    )
    return "\n".join([f"| {cells(headers)} |", sep + "|", *(f"| {cells(r)} |" for r in rows)])
