"""Where one ModelInfer's time goes: sluice's request path cut at each stage.

Usage::

    python benchmarks/request_path.py                    # tiny_mlp_batched, c=32, ~2 min
    python benchmarks/request_path.py --concurrency 8 --measurement-interval 5000

Runs perf_analyzer (same settings as batching.py) against, back to back in one run:

* ``frontend``: baseline_server.py --frontend-only: grpc.aio answering from a cache;
* ``canned``: sluice, ModelInfer answers a fixed response (the gRPC server,
  servicer and statistics of sluice, nothing else);
* ``decode``: + decoding the request into numpy arrays (codec.decode_request);
* ``sync_ort``: + routing, validation and ``session.run`` on the event loop
  thread, one request at a time (no scheduler, no worker thread);
* ``full``: sluice as shipped: the batcher, a worker thread, results back
  through ``call_soon_threadsafe``;
* ``baseline``: baseline_server.py (grpc.aio + one ``session.run`` per request
  on an executor thread).

The cut stages run a real ``sluice serve`` with ``InferenceServicer.ModelInfer``
replaced in that process only (``--serve STAGE``); nothing here changes sluice.
Each row reports throughput, p50, and the server process's CPU time per request
(from /proc, so Linux only). Writes results/request-path-<ts>.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import batching
import build_models
import harness

STAGES = ("frontend", "canned", "decode", "sync_ort", "full", "baseline")
CUT_STAGES = ("canned", "decode", "sync_ort")
MODEL = "tiny_mlp"


def _serve_cut(stage: str, sluice_argv: list[str]) -> int:
    """Child mode: `sluice serve` with ModelInfer cut after `stage`."""
    from sluice import _core
    from sluice.cli import main as sluice_main
    from sluice.proto import grpc_service_pb2 as pb
    from sluice.server import codec
    from sluice.server import inference as inf

    sessions: dict[tuple[str, int], Any] = {}

    def session_of(dp: Any, mv: Any) -> Any:
        # The sync_ort stage runs onnxruntime itself, on the loop thread.
        import onnxruntime as ort
        from sluice import config as cfg

        key = (mv.name, mv.version)
        if key not in sessions:
            directory = dp.models.model(mv.name).directory
            path = cfg.model_file(directory, mv.version, mv.config)
            so = ort.SessionOptions()
            so.intra_op_num_threads = mv.runtime.intra_op_threads
            sessions[key] = ort.InferenceSession(str(path), so)
        return sessions[key]

    async def _infer(self: Any, msg: Any, time_remaining_s: float | None = None) -> Any:
        received = _core.monotonic_ns()
        route = self._dp.models.route(msg.model_name, msg.model_version, msg.id)
        route.release()  # nothing drains while a benchmark runs
        mv = route.primary
        outputs: list[tuple[str, list[int], bytes]] = [("y", [1, 10], b"\0" * 40)]
        if stage != "canned":
            request = codec.decode_request(msg, received)
            if stage == "sync_ort":
                feeds, _rows = self._dp._validate_inputs(mv, request)
                names = [o.name for o in mv.config.output]
                results = session_of(self._dp, mv).run(names, feeds)
                outputs = [
                    (n, list(a.shape), a.tobytes()) for n, a in zip(names, results, strict=True)
                ]
        # perf_analyzer reads the statistics; count the request like sluice does.
        ns = _core.monotonic_ns() - received
        mv.stats.record_request(
            request_ns=ns, queue_ns=0, compute_input_ns=0, compute_infer_ns=ns, compute_output_ns=0
        )
        mv.stats.record_execution(
            batch_size=1, compute_input_ns=0, compute_infer_ns=ns, compute_output_ns=0
        )
        response = pb.ModelInferResponse(
            model_name=mv.name, model_version=str(mv.version), id=msg.id
        )
        for name, shape, raw in outputs:
            response.outputs.add(name=name, datatype="FP32", shape=shape)
            response.raw_output_contents.append(raw)
        return response

    async def _model_infer(self: Any, msg: Any, context: Any) -> Any:
        return await _infer(self, msg, context.time_remaining())

    inf.InferenceServicer.ModelInfer = _model_infer  # type: ignore[method-assign]
    return sluice_main(["serve", *sluice_argv])


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of process `pid` and of its live descendants
    (executor processes), all threads, from /proc."""
    import psutil

    total = 0.0
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return total
    for p in procs:
        try:
            t = p.cpu_times()
        except psutil.Error:  # exited meanwhile
            continue
        total += t.user + t.system
    return total


def _server(stage: str, repo: Path) -> harness.Server:
    if stage == "frontend":
        return harness.baseline_server(repo / MODEL, frontend_only=True)
    if stage == "baseline":
        return harness.baseline_server(repo / MODEL)
    if stage == "full":
        return harness.sluice_server(repo)
    serve = harness.sluice_server(repo).argv[2:]  # the same `sluice serve` arguments
    argv = [sys.executable, str(Path(__file__).resolve()), "--serve", stage, "--", *serve]
    return harness.Server(stage, argv, harness.SLUICE_READY)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--serve", choices=CUT_STAGES, help=argparse.SUPPRESS)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--measurement-interval", type=int, default=4000, help="ms per window")
    p.add_argument("--stages", default=",".join(STAGES))
    p.add_argument("--repo", type=Path, default=harness.DEFAULT_MODEL_REPO)
    p.add_argument("--no-build", action="store_true", help="use --repo as it is")
    p.add_argument("rest", nargs="*", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.serve:
        return _serve_cut(args.serve, args.rest)

    harness.install_cleanup()
    if not args.no_build:
        build_models.build(args.repo)
    pa_args = batching.pa_settings(args.measurement_interval)
    deadline = time.monotonic() + 30 * 60
    rows: list[dict[str, Any]] = []
    for stage in args.stages.split(","):
        server = _server(stage, args.repo)
        try:
            url = server.start(timeout_s=120)
            served = f"{MODEL}_batched" if stage not in ("frontend", "baseline") else MODEL
            run = batching.Run(
                model=MODEL,
                variant=stage,
                served=served,
                server=stage,
                concurrency=args.concurrency,
            )
            assert server.proc is not None
            cpu0, t0 = _cpu_s(server.proc.pid), time.monotonic()
            batching.perf_analyzer(run, url, pa_args, deadline)
            cpu1, t1 = _cpu_s(server.proc.pid), time.monotonic()
        finally:
            server.stop()
        # perf_analyzer's warm-up and trials all count: CPU per request over the
        # whole run, at the measured rate.
        served_requests = (run.throughput or 0) * (t1 - t0)
        row = {
            "stage": stage,
            "ok": run.ok,
            "error": run.error,
            "throughput": run.throughput,
            "p50_us": run.p50_us,
            "p99_us": run.p99_us,
            "server_cpu_cores": (cpu1 - cpu0) / (t1 - t0),
            "server_cpu_us_per_request": (
                1e6 * (cpu1 - cpu0) / served_requests if served_requests else None
            ),
        }
        rows.append(row)
        print(f"[request_path] {stage}: {row}", file=sys.stderr, flush=True)

    f = harness.fmt
    front = next((r["throughput"] for r in rows if r["stage"] == "frontend"), None)
    print(
        harness.markdown_table(
            [
                "stage",
                "infer/s",
                "vs frontend",
                "p50 us",
                "p99 us",
                "server cores",
                "server CPU us/req",
            ],
            [
                [
                    r["stage"],
                    f(r["throughput"], ".0f", "-"),
                    f(r["throughput"] / front if front and r["throughput"] else None, ".2f", "-"),
                    f(r["p50_us"], ".0f", "-"),
                    f(r["p99_us"], ".0f", "-"),
                    f(r["server_cpu_cores"], ".2f", "-"),
                    f(r["server_cpu_us_per_request"], ".0f", "-"),
                ]
                for r in rows
            ],
            align="lrrrrrr",
        )
    )
    out = harness.RESULTS_DIR / f"request-path-{harness.timestamp()}.json"
    out.write_text(
        harness.to_json(
            {
                "machine": harness.machine_info(),
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
