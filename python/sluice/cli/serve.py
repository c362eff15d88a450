"""`sluice serve`: serve a model repository over KServe v2 gRPC."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from sluice import defaults
from sluice.cli.common import add_repository_argument, repository
from sluice.server import security


def serve_command(args: argparse.Namespace) -> int:
    from sluice.monitoring.cost import CostModel
    from sluice.repository import SwapPolicy
    from sluice.runtime import RuntimeOptions, available_cores
    from sluice.server.app import ServerOptions, run

    repo = repository(args)
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
        drain_delay_seconds=args.drain_delay_secs,
        grpc_listen_after_load=args.grpc_listen_after_load,
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
        strict_readiness=args.strict_readiness == "true",
        reuse_port=args.reuse_port,
        frontends=args.frontends,
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


def _frontend_count(text: str) -> int:
    try:
        count = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if not 1 <= count <= 64:
        raise argparse.ArgumentTypeError(f"{count} is outside 1..64")
    return count


def register(sub: Any) -> None:
    serve = sub.add_parser("serve", help="serve a model repository over KServe v2 gRPC")
    add_repository_argument(serve, writes=False)
    serve.add_argument("--host", default=defaults.HOST, help="address to listen on")
    serve.add_argument(
        "--grpc-port", type=int, default=defaults.GRPC_PORT, help="0 picks a free port"
    )
    serve.add_argument(
        "--http-port",
        type=int,
        default=defaults.HTTP_PORT,
        help="KServe v2 REST and /metrics; 0 picks a free port",
    )
    serve.add_argument(
        "--grace-seconds",
        type=float,
        default=defaults.GRACE_SECONDS,
        help="on SIGINT/SIGTERM, time to finish accepted requests",
    )
    serve.add_argument(
        "--drain-delay-secs",
        type=float,
        default=0.0,
        help="on SIGINT/SIGTERM, seconds to keep serving while reporting not ready, "
        "before refusing new RPCs (lets load balancers stop routing here first)",
    )
    serve.add_argument(
        "--grpc-listen-after-load",
        action="store_true",
        help="open the gRPC port only when the initial load is done (for load "
        "balancers that do not check readiness, such as nginx)",
    )
    serve.add_argument(
        "--grpc-max-message-bytes",
        type=int,
        default=defaults.MAX_MESSAGE_BYTES,
        help="largest request or response; larger ones get RESOURCE_EXHAUSTED",
    )
    serve.add_argument(
        "--default-max-batch-size",
        type=int,
        default=defaults.DEFAULT_MAX_BATCH_SIZE,
        help="max_batch_size given to batchable models without a config, as Triton",
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
        "--frontends",
        type=_frontend_count,
        default=1,
        metavar="N",
        help="gRPC frontend processes sharing the gRPC port (1-64). 1 serves gRPC in the "
        "server process; N > 1 spreads gRPC's per-call CPU over N processes that forward "
        "to one model host (one set of batchers, statistics and metrics). See the README "
        "for choosing N",
    )
    serve.add_argument(
        "--strict-readiness",
        choices=("true", "false"),
        default="true",
        help="true (Triton's default): not ready while a model that should load is "
        "unavailable; false: ready once the start-up load has run",
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
        "--repository-poll-secs",
        type=float,
        default=defaults.REPOSITORY_POLL_SECS,
        help="rescan period in poll mode",
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
    serve.set_defaults(func=serve_command)
