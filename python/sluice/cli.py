"""The `sluice` command line: serve, infer, bench, models, profile, drift."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

from sluice import __version__, datatypes
from sluice.server import security


def _serve(args: argparse.Namespace) -> int:
    from sluice.monitoring.cost import CostModel
    from sluice.repository import SwapPolicy
    from sluice.runtime import RuntimeOptions, available_cores
    from sluice.server.app import EXAMPLES, ServerOptions, run

    repo = Path(args.model_repository) if args.model_repository else EXAMPLES
    if not repo.is_dir():
        print(f"sluice: model repository {repo} is not a directory", file=sys.stderr)
        return 2
    try:
        secured = security.options_from_args(args)
    except ValueError as exc:
        print(f"sluice: {exc}", file=sys.stderr)
        return 2
    options = ServerOptions(
        model_repository=repo,
        host=args.host,
        grpc_port=args.grpc_port,
        http_port=args.http_port,
        grace_seconds=args.grace_seconds,
        max_message_bytes=args.grpc_max_message_bytes,
        runtime=RuntimeOptions(
            provider_fallback=args.execution_provider_fallback,
            default_max_batch_size=args.default_max_batch_size,
            executor=args.executor,
        ),
        control_mode=args.model_control_mode,
        repository_poll_secs=args.repository_poll_secs,
        load_models=tuple(args.load_model),
        swap_policy=SwapPolicy(args.swap_policy),
        allow_metrics=args.allow_metrics == "true",
        reuse_port=args.reuse_port,
        cost=CostModel(
            usd_per_hour=args.cost_per_hour,
            usd_per_gpu_hour=args.cost_per_gpu_hour,
            gpus=args.gpus,
            cores=available_cores(),
        ),
        **secured,
    )
    try:
        run(options)
    except OSError as exc:  # a busy port, an address that cannot be bound: one line
        print(f"sluice: {exc.strerror or exc}", file=sys.stderr)
        return 2
    return 0


def _parse_input(spec: str) -> tuple[str, np.ndarray[Any, Any]]:
    name, sep, value = spec.partition("=")
    if not sep or not name:
        raise ValueError(f"--input wants NAME=<json or file.npy>, got {spec!r}")
    if value.endswith(".npy"):
        return name, np.load(value, allow_pickle=False)
    return name, np.asarray(json.loads(value))


def _random_inputs(meta: Any) -> dict[str, np.ndarray[Any, Any]]:
    rng = np.random.default_rng()
    feeds: dict[str, np.ndarray[Any, Any]] = {}
    for t in meta.inputs:
        shape = [d if d >= 0 else 1 for d in t.shape]
        dt = datatypes.BY_WIRE[t.datatype]
        if dt.is_bytes:
            feeds[t.name] = np.full(shape, "sluice", dtype=object)
        elif dt.numpy is not None and dt.numpy.kind == "f":
            feeds[t.name] = rng.standard_normal(shape).astype(dt.numpy)
        elif dt.numpy is not None and dt.numpy.kind == "b":
            feeds[t.name] = rng.integers(0, 2, size=shape).astype(bool)
        else:
            assert dt.numpy is not None
            feeds[t.name] = rng.integers(0, 10, size=shape).astype(dt.numpy)
    return feeds


def _infer(args: argparse.Namespace) -> int:
    from sluice.server.client import ClientError, InferenceClient

    client = InferenceClient(
        args.url, timeout_s=args.timeout, tls=security.client_tls_from_args(args)
    )
    try:
        meta = client.metadata(args.model, args.model_version)
        types = {t.name: t.datatype for t in meta.inputs}
        feeds = _random_inputs(meta) if args.random else {}
        for spec in args.input:
            name, arr = _parse_input(spec)
            if name in types and datatypes.BY_WIRE[types[name]].numpy is not None:
                dt = datatypes.BY_WIRE[types[name]]
                arr = arr.astype(object if dt.is_bytes else dt.numpy)
            feeds[name] = arr
        if not feeds:
            print(
                "sluice infer: give --input NAME=VALUE for each input, or --random", file=sys.stderr
            )
            return 2
        response, outputs = client.infer(args.model, feeds, args.model_version, args.output)
    except ClientError as exc:
        print(f"sluice infer: {exc}", file=sys.stderr)
        return 1
    except ValueError as exc:
        print(f"sluice infer: {exc}", file=sys.stderr)
        return 2
    finally:
        client.close()
    result = {
        "model_name": response.model_name,
        "model_version": response.model_version,
        "outputs": {
            name: {
                "datatype": t.datatype,
                "shape": list(t.shape),
                "data": [
                    v.decode("utf-8", "replace") if isinstance(v, bytes) else v
                    for v in arr.reshape(-1).tolist()
                ],
            }
            for (name, arr), t in zip(outputs.items(), response.outputs, strict=True)
        },
    }
    print(json.dumps(result, indent=2))
    return 0


def _parse_shape(spec: str) -> tuple[str, tuple[int, ...]]:
    name, sep, dims = spec.partition("=")
    try:
        shape = tuple(int(d) for d in dims.split(",")) if dims else ()
    except ValueError:
        shape = (-1,)
    if not sep or not name or any(d < 1 for d in shape):
        raise ValueError(f"--shape wants NAME=d1,d2,... with dims >= 1, got {spec!r}")
    return name, shape


def _bench(args: argparse.Namespace) -> int:
    from sluice import bench, bench_report

    try:
        inputs = dict(_parse_input(spec) for spec in args.input)
        shapes = dict(_parse_shape(spec) for spec in args.shape)
    except (ValueError, OSError) as exc:
        print(f"sluice bench: {exc}", file=sys.stderr)
        return 2
    options = bench.BenchOptions(
        model=args.model,
        url=args.url,
        version=args.model_version,
        concurrency=args.concurrency,
        duration_s=args.duration,
        requests=args.requests,
        batch_size=args.batch_size,
        inputs=inputs,
        shapes=shapes,
        warmup_requests=args.warmup_requests,
        metrics_url=args.metrics_url,
        timeout_s=args.timeout,
        progress=not args.no_progress,
    )
    try:
        if args.plot:
            bench_report.require_matplotlib()
        report = bench.run(options)
        if args.plot:
            bench_report.plot(report, Path(args.plot))
    except bench.BenchError as exc:
        print(f"sluice bench: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    if args.json:
        print(json.dumps(report.summary, indent=2))
    else:
        print(bench_report.format_table(report.summary))
    if args.plot:
        print(f"sluice bench: plot written to {args.plot}", file=sys.stderr)
    return 0


def _models(args: argparse.Namespace) -> int:
    # Imported here: the registry pulls in onnx and onnxruntime, which the
    # other commands do not need.
    from sluice.repository import registry_cli

    result: int = registry_cli.run(args)
    return result


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sluice", description="ONNX inference serving")
    parser.add_argument("--version", action="version", version=f"sluice {__version__}")
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING, ERROR")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="serve a model repository over KServe v2 gRPC")
    serve.add_argument("--model-repository", help="repository folder (default: bundled examples)")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on")
    serve.add_argument("--grpc-port", type=int, default=8001, help="0 picks a free port")
    serve.add_argument(
        "--http-port", type=int, default=8002, help="metrics and health; 0 = free port"
    )
    serve.add_argument(
        "--grace-seconds",
        type=float,
        default=30.0,
        help="on SIGINT/SIGTERM, time to finish accepted requests",
    )
    serve.add_argument(
        "--grpc-max-message-bytes",
        type=int,
        default=256 * 1024 * 1024,
        help="largest request or response; larger ones get RESOURCE_EXHAUSTED",
    )
    serve.add_argument(
        "--default-max-batch-size",
        type=int,
        default=4,
        help="max_batch_size given to batchable models without a config (Triton: 4)",
    )
    serve.add_argument(
        "--execution-provider-fallback",
        choices=("fail", "cpu"),
        default="fail",
        help="when a requested GPU provider is not active: fail the load, or serve "
        "on the CPU flagged as degraded",
    )
    serve.add_argument(
        "--reuse-port",
        action="store_true",
        help="share the gRPC port with another process on purpose (SO_REUSEPORT); without "
        "it, a port that another process listens on stops the start with a message naming it",
    )
    serve.add_argument(
        "--executor",
        choices=("thread", "process"),
        default="thread",
        help="where batches run: 'thread' (worker threads in the server process) or "
        "'process' (one child process per model instance: execution leaves the server's "
        "GIL and a crash fails only its batch); a model's 'executor' parameter overrides it",
    )
    serve.add_argument(
        "--allow-metrics",
        choices=("true", "false"),
        default="true",
        help="false: no /metrics and no histograms (Triton's flag; for overhead comparisons)",
    )
    serve.add_argument(
        "--model-control-mode",
        choices=("none", "poll", "explicit"),
        default="none",
        help="none: load everything at start; poll: also rescan the repository; "
        "explicit: load/unload through the repository RPCs",
    )
    serve.add_argument(
        "--repository-poll-secs", type=float, default=15.0, help="rescan period in poll mode"
    )
    serve.add_argument(
        "--load-model",
        action="append",
        default=[],
        metavar="NAME",
        help="explicit mode: load this model at start ('*' = all); repeatable",
    )
    serve.add_argument(
        "--swap-policy",
        choices=("availability", "resource"),
        default="availability",
        help="availability: load the new version before unloading the old (no gap); "
        "resource: unload first (never two copies in memory)",
    )
    serve.add_argument(
        "--cost-per-hour",
        type=float,
        default=0.0,
        metavar="USD",
        help="the machine's price per hour, for sluice_inference_cost_usd_total",
    )
    serve.add_argument(
        "--cost-per-gpu-hour",
        type=float,
        default=0.0,
        metavar="USD",
        help="added per GPU (see --gpus)",
    )
    serve.add_argument("--gpus", type=int, default=0, help="GPUs priced by --cost-per-gpu-hour")
    security.add_serve_arguments(serve)  # TLS, restricted APIs, request bounds (issue 15)
    serve.set_defaults(func=_serve)

    infer = sub.add_parser("infer", help="send one inference request and print the outputs")
    infer.add_argument("model")
    infer.add_argument(
        "--input",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a JSON array or a .npy file; repeat per input",
    )
    infer.add_argument(
        "--random", action="store_true", help="random data for inputs not given (dynamic dims = 1)"
    )
    infer.add_argument("--output", action="append", help="request only these outputs")
    infer.add_argument("--model-version", default="")
    infer.add_argument("--url", default="127.0.0.1:8001")
    infer.add_argument("--timeout", type=float, default=30.0)
    security.add_client_arguments(infer)
    infer.set_defaults(func=_infer)

    models = sub.add_parser("models", help="model registry: publish versions, inspect, label")
    models_sub = models.add_subparsers(dest="models_command", required=True)
    models_repo = argparse.ArgumentParser(add_help=False)
    models_repo.add_argument(
        "--model-repository",
        help="repository folder (list/show/diff default: the bundled examples; "
        "publish/promote/rollback require it)",
    )
    models_publish = models_sub.add_parser(
        "publish",
        parents=[models_repo],
        help="add the next version atomically, with lineage in metadata.json",
    )
    models_publish.add_argument("model")
    models_publish.add_argument(
        "--profile",
        metavar="DATA",
        help="also store the drift reference profile of the new version from DATA "
        "(.npy, .npz, .csv; see `sluice profile`)",
    )
    models_publish.add_argument("file", metavar="FILE.onnx")
    models_publish.add_argument("--source", help="where the file came from (default: its name)")
    for option, meta, text in (
        ("--param", "KEY=VALUE", "a training parameter"),
        ("--metric", "KEY=NUMBER", "an evaluation metric"),
        ("--tag", "KEY=VALUE", "a tag"),
    ):
        models_publish.add_argument(
            option, action="append", default=[], metavar=meta, help=f"{text}; repeatable"
        )
    models_list = models_sub.add_parser(
        "list", parents=[models_repo], help="models, versions, lineage and labels"
    )
    models_show = models_sub.add_parser(
        "show", parents=[models_repo], help="one version's metadata, signature and config"
    )
    models_show.add_argument("model")
    models_show.add_argument("version", type=int, nargs="?", help="default: the latest")
    models_diff = models_sub.add_parser(
        "diff", parents=[models_repo], help="signature and lineage changes between versions"
    )
    models_diff.add_argument("model")
    models_diff.add_argument("old", type=int, metavar="V1")
    models_diff.add_argument("new", type=int, metavar="V2")
    models_promote = models_sub.add_parser(
        "promote", parents=[models_repo], help="label a version stable, canary or shadow"
    )
    models_promote.add_argument("model")
    models_promote.add_argument("version", type=int)
    models_promote.add_argument("--label", choices=("stable", "canary", "shadow"), default="stable")
    models_promote.add_argument(
        "--weight", type=float, help="canary: share of unversioned requests, in [0, 1]"
    )
    models_promote.add_argument(
        "--sticky", action="store_true", help="canary: a request id always gets the same arm"
    )
    models_promote.add_argument(
        "--sample", type=float, help="shadow: share of requests mirrored to it, in [0, 1]"
    )
    models_rollback = models_sub.add_parser(
        "rollback",
        parents=[models_repo],
        help="set stable back to the previous stable version and clear the canary",
    )
    models_rollback.add_argument("model")
    for json_parser in (models_publish, models_list, models_show, models_diff):
        json_parser.add_argument("--json", action="store_true", help="print JSON")
    models.set_defaults(func=_models)

    bench = sub.add_parser(
        "bench", help="load-test one model: closed-loop concurrency, latency, cost"
    )
    bench.add_argument("model")
    bench.add_argument("--url", default="127.0.0.1:8001", help="gRPC host:port")
    bench.add_argument("--model-version", default="", help="default: the server's choice")
    bench.add_argument(
        "--concurrency", type=int, default=8, help="requests kept in flight (closed loop)"
    )
    bench.add_argument(
        "--duration",
        type=float,
        metavar="SECONDS",
        help="stop after this long (default 10 s unless --requests is given; "
        "with both, whichever comes first)",
    )
    bench.add_argument("--requests", type=int, metavar="N", help="stop after N requests")
    bench.add_argument(
        "--batch-size", type=int, default=1, help="rows per request, for batching models"
    )
    bench.add_argument(
        "--input",
        action="append",
        default=[],
        metavar="NAME=file.npy",
        help="send this data (full shape, batch included); other inputs get random data",
    )
    bench.add_argument(
        "--shape",
        action="append",
        default=[],
        metavar="NAME=d1,d2,...",
        help="shape of a random input, without the batch dimension (default: dynamic dims = 1)",
    )
    bench.add_argument(
        "--warmup-requests", type=int, default=20, help="sent first and left out of the numbers"
    )
    bench.add_argument(
        "--metrics-url",
        help="the server's Prometheus page (default http://<grpc host>:8002/metrics)",
    )
    bench.add_argument("--timeout", type=float, default=30.0, help="per-request deadline, seconds")
    bench.add_argument("--json", action="store_true", help="print one JSON object, not a table")
    bench.add_argument(
        "--plot", metavar="FILE.png", help="latency and throughput over time (needs matplotlib)"
    )
    bench.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    bench.set_defaults(func=_bench)

    from sluice import drift_cli

    drift_cli.add_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        result: int = args.func(args)
        sys.stdout.flush()
    except BrokenPipeError:
        # The reader went away (`sluice models list | head`): stop quietly, as
        # Unix tools do, instead of a traceback; flushing at exit would fail too.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, what a shell reports for it
    return result


if __name__ == "__main__":
    sys.exit(main())
