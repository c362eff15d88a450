"""The `sluice` command line. One module per command group, each with a
`register(subparsers)` that adds its parsers and sets `func` to the function
that runs it; `main` parses and dispatches. Heavy imports (onnxruntime, grpc,
matplotlib) happen inside the commands that need them."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from sluice import __version__
from sluice.cli import bench, drift, feedback, infer, models, offline, serve
from sluice.cli.common import LOG_LEVELS, ArgumentParser, check_tls_arguments, print_help

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="sluice", description="ONNX inference serving")
    parser.add_argument("--version", action="version", version=f"sluice {__version__}")
    parser.add_argument(
        "--log-level",
        default="INFO",
        type=str.upper,
        choices=LOG_LEVELS,
        help="log messages of this level and above, on stderr",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    parser.set_defaults(func=print_help(parser))

    for group in (serve, infer, bench, models, drift, feedback, offline):
        group.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        check_tls_arguments(args)
    except ValueError as exc:
        parser.error(str(exc))  # exits 2 with the usage, as argparse's own checks do
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
