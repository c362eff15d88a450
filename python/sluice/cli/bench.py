"""`sluice bench`: the command line of the load generator (sluice.cli.loadgen),
its table and its plot (sluice.cli.bench_report)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from sluice import defaults
from sluice.cli.common import add_url_arguments, client_tls, parse_input


def _parse_shape(spec: str) -> tuple[str, tuple[int, ...]]:
    name, sep, dims = spec.partition("=")
    try:
        shape = tuple(int(d) for d in dims.split(",")) if dims else ()
    except ValueError:
        shape = (-1,)
    if not sep or not name or any(d < 1 for d in shape):
        raise ValueError(f"--shape wants NAME=d1,d2,... with dims >= 1, got {spec!r}")
    return name, shape


def bench_command(args: argparse.Namespace) -> int:
    from sluice.cli import bench_report, loadgen

    try:
        inputs = dict(parse_input(spec) for spec in args.input)
        shapes = dict(_parse_shape(spec) for spec in args.shape)
    except (ValueError, OSError) as exc:
        print(f"sluice bench: {exc}", file=sys.stderr)
        return 2
    options = loadgen.BenchOptions(
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
        tls=client_tls(args),
    )
    try:
        if args.plot:
            bench_report.require_matplotlib()
        report = loadgen.run(options)
        if args.plot:
            bench_report.plot(report, Path(args.plot))
    except loadgen.BenchError as exc:
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


def register(sub: Any) -> None:
    bench = sub.add_parser(
        "bench", help="load-test one model: closed-loop concurrency, latency, cost"
    )
    bench.add_argument("model", help="model name as served")
    bench.add_argument(
        "--model-version", default="", help="a version number (default: the server's choice)"
    )
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
    bench.add_argument("--requests", type=int, metavar="N", help="stop after N measured requests")
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
        default=defaults.client_metrics_url(),
        help="the server's Prometheus page, for cost (default: $SLUICE_METRICS_URL, else "
        "http://<--url host>:8002/metrics; cost is left out when its counts disagree with "
        "the gRPC server's; an https:// page is checked with the TLS options below)",
    )
    add_url_arguments(bench)
    bench.add_argument("--json", action="store_true", help="print one JSON object, not a table")
    bench.add_argument(
        "--plot", metavar="FILE.png", help="latency and throughput over time (needs matplotlib)"
    )
    bench.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    bench.set_defaults(func=bench_command)
